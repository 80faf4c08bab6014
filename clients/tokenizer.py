"""Client-side tokenizer: the model folder's `tokenizer.json` through `tokenizers` (no torch)."""

from __future__ import annotations

import pathlib

from tokenizers import Tokenizer

from specmesh.clients.gguf_folder import model_folder


class TextCodec:
    """encode(text) -> ids (with BOS as the model's tokenizer adds it); decode(ids) -> text."""

    def __init__(self, model_dir: str | pathlib.Path):
        """`model_dir`: a model folder with tokenizer.json, or a `.gguf` file."""
        path = model_folder(model_dir) / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
