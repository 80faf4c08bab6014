"""A model folder's chat template (`tokenizer_config.json` "chat_template"), rendered as HF
transformers renders it: Jinja2 in a sandbox, `messages` + `add_generation_prompt`, the
tokenizer's special tokens as variables. No torch, no transformers."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from specmesh.clients.gguf_folder import model_folder
from specmesh.errors import InvalidRequest

ROLES = ("system", "user", "assistant", "tool")


def _token_text(value) -> str:
    """A special token as tokenizer_config.json writes it (a string or an AddedToken dict)."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value or "")


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(source)
        self.special_tokens = special_tokens

    @classmethod
    def from_model_dir(cls, model_dir: str | pathlib.Path) -> "ChatTemplate | None":
        """The folder's template (`tokenizer_config.json`, or transformers 5's
        `chat_template.jinja`; a `.gguf` file: its metadata's), or None when there is none."""
        folder = model_folder(model_dir)
        path = folder / "tokenizer_config.json"
        if not path.exists():
            return None
        config = json.loads(path.read_text())
        source = config.get("chat_template")
        if not source and (folder / "chat_template.jinja").exists():
            source = (folder / "chat_template.jinja").read_text()
        if isinstance(source, list):  # named templates: take "default"
            source = next((t.get("template") for t in source if t.get("name") == "default"),
                          None)
        if not source:
            return None
        tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token",
                                                         "pad_token")}
        return cls(source, tokens)

    def encode(self, messages: Sequence[dict], codec) -> list[int]:
        """The rendered prompt as token ids: the template's own BOS, else the tokenizer's."""
        text = self.render(messages)
        bos = self.special_tokens.get("bos_token")
        return codec.encode(text, add_special_tokens=not (bos and text.startswith(bos)))

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text; InvalidRequest names the bad message field."""
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise InvalidRequest(f"messages[{i}].role", f"{m.get('role')!r} not in {ROLES}")
            if not isinstance(m.get("content"), str):
                raise InvalidRequest(f"messages[{i}].content", "must be a string")
        if not messages:
            raise InvalidRequest("messages", "at least one message is needed")
        try:
            return self._template.render(messages=list(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except TemplateError as exc:
            raise InvalidRequest("messages", f"the chat template refused them: {exc}") from exc


def _raise(message: str):
    raise TemplateError(message)
