"""Load a Llama-family checkpoint (HF `config.json` + safetensors) into `kernels.Transformer`."""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from safetensors import safe_open

from specmesh.kernels import gguf
from specmesh.kernels.config import ModelConfig
from specmesh.kernels.model import Transformer


@dataclass
class LoadedModel:
    """A model ready to run, with the facts the services report about it."""

    model: Transformer
    config: ModelConfig
    path: pathlib.Path
    dtype: torch.dtype
    device: torch.device
    fingerprint: str  # sha256 over weights bytes + dtype + layout, salts cache keys

    @property
    def name(self) -> str:
        return self.path.name


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"no model.safetensors in {path}")
    return [single]


def _fingerprint(files: list[pathlib.Path], cfg: ModelConfig, dtype: torch.dtype,
                 quantize: str = "none") -> str:
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    extra = () if quantize == "none" else (quantize,)  # unquantized: the fingerprint as ever
    h.update(repr((cfg, str(dtype), "paged-kv-v1", *extra)).encode())
    return h.hexdigest()[:32]


Progress = Callable[..., Iterable]  # (iterable, total=..., desc=..., unit=...) -> iterable


def _read_tensors(files: list[pathlib.Path], progress: Progress | None) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors `files`, one at a time through `progress` (a bar)."""
    handles = [safe_open(str(f), framework="pt") for f in files]
    names = [(h, k) for h in handles for k in h.keys()]
    items = names if progress is None else progress(names, total=len(names), unit="tensor",
                                                    desc=f"loading {files[0].parent.name}")
    return {k: h.get_tensor(k) for h, k in items}


def load_model(path: str | pathlib.Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", fuse: bool = True,
               progress: Progress | None = None, quantize: str = "none") -> LoadedModel:
    """Load `path` (an HF model folder, or a Llama-family `.gguf` file, dequantized) as `dtype`
    on `device`, in eval mode; `fuse` merges q/k/v and gate/up projections (frees the separate
    copies). `progress` wraps the tensor reads (e.g. `specmesh.wire.progress.progress`).
    `quantize="int8"`: a draft model's projections in int8 (`kernels.quantize`; CPU only)."""
    path = pathlib.Path(path)
    if gguf.is_gguf(path):
        r = gguf.reader(path)
        raw = gguf.hf_config(r)
        cfg, files = ModelConfig.from_dict(raw), [path]
        state = gguf.hf_state_dict(r, raw, progress)
    else:
        cfg = ModelConfig.from_hf(path)
        files = _weight_files(path)
        state = _read_tensors(files, progress)
    qkv_bias = "model.layers.0.self_attn.q_proj.bias" in state
    o_bias = "model.layers.0.self_attn.o_proj.bias" in state
    model = Transformer(cfg, qkv_bias=qkv_bias, o_bias=o_bias)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    unexpected = [u for u in unexpected if not u.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"checkpoint mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model = model.to(device=device, dtype=dtype).eval()
    if fuse:
        model.fuse(quantize)
    return LoadedModel(model, cfg, path, dtype, torch.device(device),
                       _fingerprint(files, cfg, dtype, quantize))


def load_for_service(path: str | pathlib.Path, dtype: str = "float32", device: str = "cpu",
                     threads: int | None = None, batch_invariant: bool = False,
                     progress: Progress | None = None, quantize: str = "none") -> LoadedModel:
    """`load_model` as a model service runs it, on the thread that will run every forward:
    `threads` sets torch's intra-op threads first (None keeps torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)
    loaded = load_model(path, getattr(torch, dtype), device, progress=progress,
                        quantize=quantize)
    loaded.model.set_batch_invariant(batch_invariant)
    return loaded
