"""Model configuration read from a Hugging Face `config.json` (Llama, Mistral, Qwen2 shapes)."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    """The shape facts of a Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    model_type: str = "llama"

    @classmethod
    def from_hf(cls, path: str | pathlib.Path) -> "ModelConfig":
        """Read `path/config.json` (or a config.json path); raise ValueError on unsupported shapes."""
        p = pathlib.Path(path)
        return cls.from_dict(json.loads((p / "config.json" if p.is_dir() else p).read_text()))

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        """From an HF config.json's fields (ValueError on unsupported shapes)."""
        model_type = raw.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} not in {SUPPORTED_MODEL_TYPES}")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"rope type {rope_type!r} is not supported (only default RoPE)")
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        num_heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0]
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos,
            model_type=model_type,
        )
