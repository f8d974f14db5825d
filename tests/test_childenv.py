"""What a child process inherits: what it needs to run, never camrelay's settings."""

from relay.childenv import child_env


def test_children_get_only_what_they_need():
    parent = {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": "/src",
        "CAMRELAY_AUTH_TOKEN": "t0ken-t0ken-t0ken-t0ken",
        "CAMRELAY_STREAMS": "cam1=rtsp://admin:pw@10.0.0.9/s",
        "AWS_SECRET_ACCESS_KEY": "x",
        "SSH_AUTH_SOCK": "/tmp/agent",
    }
    env = child_env(parent, CAMRELAY_WORKER_CONFIG="{}")
    assert env == {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": "/src",
        "CAMRELAY_WORKER_CONFIG": "{}",
    }
