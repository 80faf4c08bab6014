"""A GGUF file as a model folder for clients: its tokenizer, chat template and config, exported
once (by `specmesh.kernels.gguf_export` in a subprocess: it needs transformers, this process
stays torch-free) into a cache keyed by the file's path, size and modification time.

    folder = model_folder("SmolLM2-135M-Instruct.Q4_1.gguf")   # a folder stays a folder
    TextCodec(folder); ChatTemplate.from_model_dir(folder)
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

COMPLETE = "specmesh-gguf-export.json"  # as specmesh.kernels.gguf_export writes it


def cache_root() -> pathlib.Path:
    env = os.environ.get("SPECMESH_GGUF_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "specmesh" / "gguf"


def model_folder(path: str | pathlib.Path) -> pathlib.Path:
    """`path` itself for a folder; for a `.gguf` file, its exported folder (made if missing)."""
    p = pathlib.Path(path).expanduser()
    if p.suffix != ".gguf" or not p.is_file():
        return p
    p = p.resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_root() / key / p.stem
    if (folder / COMPLETE).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=".export-"))
    env = dict(os.environ, PYTHONSAFEPATH="1")
    out = subprocess.run([sys.executable, "-m", "specmesh.kernels.gguf_export", str(p), str(tmp)],
                         capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"could not read the tokenizer of {p}: {out.stderr.strip()[-800:]}")
    try:
        tmp.rename(folder)  # atomic; another process may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
