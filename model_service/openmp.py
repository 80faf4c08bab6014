"""OpenMP settings a model service applies before torch loads libgomp.

libgomp reads its environment once, when the library is loaded (that is, when torch is first
imported); a variable set after that changes nothing. So this module imports nothing heavy, and
a service's `__main__` calls `tune_openmp()` before its first import that reaches torch:

    from specmesh.model_service.openmp import tune_openmp
    tune_openmp()  # before torch loads
    from specmesh.model_service.startup import ServiceSpec, main
"""

from __future__ import annotations

import os
import sys

# libgomp spins this many rounds before an idle thread sleeps; its default (300000, ~8 ms on
# this class of CPU) kept one service's idle OpenMP worker burning a core while the other
# service, the RPC threads and the client waited for one. README "A short OpenMP spin".
GOMP_SPINCOUNT = "20000"

applied_before_torch: bool | None = None
"""None until `tune_openmp()` runs; then whether torch (and so libgomp) was still unloaded."""


def tune_openmp() -> None:
    """Set our default spin count unless the environment sets one; `applied_before_torch`
    records whether it can still take effect (torch not imported yet)."""
    global applied_before_torch
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
    applied_before_torch = "torch" not in sys.modules
