"""The camera's worker process: capture, decode once, encode once (``python -m relay.camera.worker``).

Runs in a process of its own per stream (PyAV and numpy hold the GIL through
a whole decode); the relay imports none of this package and talks to it only
through ``relay.ipc``. The viewers' pixel-clock reader (``pixelclock``) is
here too: the pattern and the slate write the clock, test viewers read it.
"""
