"""With ``BENCH_LOOPCOST`` set, a ``relay serve`` started with this directory on its ``PYTHONPATH`` times its
event loop's callbacks (``benchmarks/loopcost.py``, loaded from its file: nothing of the relay or of this tree's
packages is imported, so a ``--base-tree`` relay runs its own code)."""

import importlib.util
import os
import sys
from pathlib import Path

if os.environ.get("BENCH_LOOPCOST") and "relay" in sys.orig_argv and "serve" in sys.orig_argv:
    _spec = importlib.util.spec_from_file_location("camrelay_loopcost", Path(__file__).parent.parent / "loopcost.py")
    _loopcost = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_loopcost)
    _loopcost.install(os.environ["BENCH_LOOPCOST"])
