"""Progress bars for long work (model loading, `specmesh bench`, starting a local stack).

    for name in progress(names, desc="loading", unit="tensor"):
        ...

tqdm on stderr when stderr is a terminal; nothing when it is not, when the caller prints machine
output (`quiet=True`, e.g. `--json`), or with SPECMESH_PROGRESS=0 (SPECMESH_PROGRESS=1 forces
bars on, e.g. under a pager that is still a person watching).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

ENV = "SPECMESH_PROGRESS"


def progress_enabled(quiet: bool = False) -> bool:
    if quiet:
        return False
    forced = os.environ.get(ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def progress(iterable: Iterable | None = None, *, quiet: bool = False, **kwargs) -> tqdm:
    """A tqdm bar (disabled as the module docstring says) that vanishes when done unless
    `leave=True`; use as an iterable wrapper or, with `total=`, with `.update()`."""
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=not progress_enabled(quiet), file=sys.stderr,
                dynamic_ncols=True, **kwargs)
