"""A name for a target model that every local service can agree on without loading it.

The fleet n-gram table (`specmesh serve draft --ngram-fleet-key KEY`) is keyed by an operator
setting that stands for the target model and its tokenizer. A local stack (`specmesh generate
--draft ngram --ngram-fleet`, `specmesh.launch(..., ngram_fleet=True)`) derives it here, with no
torch: for a model folder, the names and sizes of its files plus the bytes of its small
description files (config, tokenizer, generation config); for a single file (GGUF), its name,
size and first MiB (the GGUF header: metadata and tokenizer). Same checkpoint, same key;
another checkpoint or tokenizer, another key.
"""

from __future__ import annotations

import hashlib
import pathlib

DESCRIBING = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
              "tokenizer_config.json", "special_tokens_map.json")
HEAD_BYTES = 1 << 20


def model_key(path: str | pathlib.Path) -> str:
    """'model-' + 32 hex digits naming the checkpoint at `path` (a folder or one file)."""
    path = pathlib.Path(path)
    h = hashlib.sha256(b"specmesh-model-key-v1")
    if path.is_file():
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            h.update(f.read(HEAD_BYTES))
    else:
        for f in sorted(p for p in path.iterdir() if p.is_file()):
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
            if f.name in DESCRIBING:
                h.update(f.read_bytes())
    return "model-" + h.hexdigest()[:32]
