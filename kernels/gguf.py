"""Llama-family GGUF checkpoints (llama.cpp's format) through the maintained `gguf` package.

    config = hf_config(reader)              # config.json fields from the GGUF metadata
    state = hf_state_dict(reader, config)   # HF parameter names -> float32 tensors

Weights are dequantized at load (`gguf.quants.dequantize`: Q4_0/Q4_1/Q8_0/K-quants/F16/...);
llama.cpp stores Q and K rows permuted for its RoPE layout, undone here so the tensors match
the HF checkpoint the file was converted from.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

GGUF_SUFFIX = ".gguf"
_LAYER_NAMES = {  # llama.cpp tensor -> HF parameter, per block
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
              "output": "lm_head"}


def is_gguf(path: str | pathlib.Path) -> bool:
    p = pathlib.Path(path)
    return p.suffix == GGUF_SUFFIX and p.is_file()


def reader(path: str | pathlib.Path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def field(r, key: str, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def hf_config(r) -> dict:
    """An HF `config.json` dict for a Llama-architecture GGUF (ValueError for others)."""
    arch = field(r, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r}: only llama-family files are supported")
    a = f"{arch}."
    heads = int(field(r, a + "attention.head_count"))
    hidden = int(field(r, a + "embedding_length"))
    names = {t.name for t in r.tensors}
    vocab = field(r, a + "vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab), "hidden_size": hidden,
        "intermediate_size": int(field(r, a + "feed_forward_length")),
        "num_hidden_layers": int(field(r, a + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(r, a + "attention.head_count_kv", heads)),
        "head_dim": int(field(r, a + "rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(field(r, a + "context_length", 2048)),
        "rms_norm_eps": float(field(r, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(field(r, a + "rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": field(r, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(r, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (KeyError if unknown)."""
    base, _, kind = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    return f"{_TOP_NAMES[base]}.{kind}"


def unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation. w: [num_heads * head_dim, in]."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state_dict(r, config: dict, progress=None) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32 under its HF name (skips rope frequency tables)."""
    from gguf.quants import dequantize

    tensors = [t for t in r.tensors if not t.name.startswith("rope_")]
    items = tensors if progress is None else progress(tensors, total=len(tensors),
                                                      unit="tensor", desc="dequantizing")
    out = {}
    for t in items:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)  # numpy order
        w = w.reshape([int(d) for d in reversed(t.shape.tolist())])  # [rows, cols]
        kind = t.name.split(".")[-2]
        if kind == "attn_q":
            w = unpermute(w, config["num_attention_heads"])
        elif kind == "attn_k":
            w = unpermute(w, config["num_key_value_heads"])
        out[hf_name(t.name)] = torch.from_numpy(np.array(w, copy=True))  # owned, writable
    return out
