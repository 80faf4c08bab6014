"""Client-side tokenizer: the model folder's `tokenizer.json` through `tokenizers` (no torch)."""

from __future__ import annotations

import pathlib
import re

from tokenizers import Tokenizer

from specmesh.clients.gguf_folder import model_folder

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TextCodec:
    """encode(text) -> ids (with BOS as the model's tokenizer adds it); decode(ids) -> text."""

    def __init__(self, model_dir: str | pathlib.Path):
        """`model_dir`: a model folder with tokenizer.json, or a `.gguf` file."""
        path = model_folder(model_dir) / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
        self._tok = Tokenizer.from_file(str(path))
        # byte-fallback tokens ('<0x41>': a run of them decodes as a unit) and special ones
        # (dropped from text, so the next token's leading space would be stripped): a decode
        # window holding one may not join the text before it (clients.detokenize)
        self.irregular_ids = frozenset(
            [i for token, i in self._tok.get_vocab().items() if _BYTE_TOKEN.fullmatch(token)]
            + [i for i, t in self._tok.get_added_tokens_decoder().items() if t.special])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
