"""A camera worker process one of whose cameras can crash it, for tests: ``python -m tests.crashworker``, run by the
relay's ``Worker`` in place of ``python -m relay.camera.worker`` (``relay.stream.WORKER_MODULE``).

It is ``relay.camera.worker`` as it is, each camera's source as ``open_source`` makes it, except that a camera's
``read_packet`` calls ``os.abort()`` (a decoder's segfault, an abort in a library: the whole process dies, every
camera in it) while a file named ``crash-<camera>`` lies beside its ``file:`` source, or once, removing it, for a
file ``crash-once-<camera>``. The crash follows the camera into whatever process runs it.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

from relay.camera import capture, worker

TRIGGER = "crash-{name}"  # beside a camera's file: its reads abort the process
ONCE = "crash-once-{name}"  # beside a camera's file: its next read removes it and aborts the process


def crashing(spec, width, height, fps, label, *args, **kwargs):  # noqa: ANN001, ANN201 (open_source's)
    source = capture.open_source(spec, width, height, fps, label, *args, **kwargs)
    trigger, once = (Path(spec.target).parent / name.format(name=label) for name in (TRIGGER, ONCE))
    read_packet = source.read_packet

    def read_or_crash():  # noqa: ANN202
        if trigger.exists():
            os.abort()
        if once.exists():
            once.unlink()
            os.abort()
        return read_packet()

    source.read_packet = read_or_crash
    return source


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort leaves no core file behind
    worker.open_source = crashing
    sys.exit(worker.main())
