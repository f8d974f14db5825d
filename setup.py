"""The C send path (relay/webrtc/_fastsend.c), built by ``pip install -e .`` beside the rest of pyproject.toml's
package. Optional: where it cannot be built (no compiler, no Python headers, not Linux), set-up goes on and the
relay sends through its Python path (relay.webrtc.rtpsend says which)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "relay.webrtc._fastsend",
            sources=["relay/webrtc/_fastsend.c"],
            extra_compile_args=["-Wall", "-Wextra"],
            optional=True,
        )
    ]
)
