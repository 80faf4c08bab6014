"""Import Hugging Face transformers from a specmesh checkout.

transformers >= 5 imports Hugging Face's `kernels` package. With the repository root on
`sys.path` (`python -m ...` or pytest run from it), the root's `kernels/` folder (our layer,
installed as `specmesh.kernels`) would be found first and transformers would fail to import.
`installed_kernels_first()` imports the installed `kernels` with the root left out, so
`sys.modules["kernels"]` is theirs; ours is only ever imported as `specmesh.kernels`.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]  # the checkout (kernels/ is its child)


def installed_kernels_first() -> None:
    if "kernels" in sys.modules:
        return
    ours = {str(REPO), str(REPO.resolve())}
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if os.path.abspath(p or ".") not in ours]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: transformers does not need it then
        pass
    finally:
        sys.path[:] = saved
