"""Baselines with HF transformers `generate`: target alone and with `assistant_model=` the draft.

Sequential requests (concurrency 1): HF assisted generation supports batch size 1 only. Run in
the bench's own process while our stack is down, so the two never compete for the cores.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable

from specmesh.kernels.hf_import import installed_kernels_first
from specmesh.loadtest.bench_results import (
    HF_ASSISTED,
    HF_TARGET,
    ModeRun,
    RequestSample,
    summarise,
)
from specmesh.wire.progress import progress

WARMUP_TOKENS = 8


def _timing_streamer():
    """A streamer that records when each chunk of new tokens arrives (the first put is the
    prompt). Under assisted generation each chunk is one round's accepted tokens + bonus."""
    from transformers.generation.streamers import BaseStreamer

    class TimingStreamer(BaseStreamer):
        def __init__(self):
            self.chunks: list[tuple[float, int]] = []  # (time, num tokens) after the prompt
            self._seen_prompt = False

        def put(self, value):  # value: [batch, n] or [n] token ids
            if not self._seen_prompt:
                self._seen_prompt = True
                return
            self.chunks.append((time.perf_counter(), int(value.numel())))

        def end(self):
            pass

    return TimingStreamer()


PROMPT_LOOKUP = "prompt-lookup:10"  # HF's own n-gram drafting, the baseline for --draft ngram


def _load(path: pathlib.Path, device: str = "cpu", dtype: str = "float32"):
    """An HF model folder, or a GGUF file (transformers dequantizes it), as `dtype` on
    `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=getattr(torch, dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def _generate(model, prompt_ids: list[int], max_new_tokens: int, assistant=None):
    """Greedy, exactly max_new_tokens (eos_token_id=None: EOS does not stop it, like ignore_eos).
    Returns (new ids, streamer)."""
    import torch

    streamer = _timing_streamer()
    ids = torch.tensor([prompt_ids], device=model.device)  # [1, prompt_len]
    if assistant == PROMPT_LOOKUP:
        extra = {"prompt_lookup_num_tokens": int(PROMPT_LOOKUP.rsplit(":", 1)[1])}
    else:
        extra = {"assistant_model": assistant} if assistant is not None else {}
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0, streamer=streamer, **extra)  # [1, prompt + new]
    return out[0, len(prompt_ids):].tolist(), streamer


def _timed(model, index: int, prompt_ids: list[int], max_new_tokens: int,
           assistant=None) -> RequestSample:
    start = time.perf_counter()
    new, streamer = _generate(model, prompt_ids, max_new_tokens, assistant)
    latency = time.perf_counter() - start
    rounds = len(streamer.chunks)
    ttft = streamer.chunks[0][0] - start if streamer.chunks else latency
    # every chunk ends with one target-chosen token; the rest are accepted draft tokens
    accepted = len(new) - rounds if assistant is not None else 0
    return RequestSample(index, new, latency, ttft, rounds, accepted)


def run_hf(target: pathlib.Path, draft: pathlib.Path | None, prompts: list[list[int]],
           max_new_tokens: int, repeats: int, log: Callable[[str], None],
           quiet: bool = False, device: str = "cpu", dtype: str = "float32") -> list[ModeRun]:
    """HF target-only and HF assisted (the draft model, or with draft None HF's prompt lookup),
    each over all prompts in order, alternating `repeats` times (requests and wall times
    pooled per mode)."""
    installed_kernels_first()  # before transformers, when run from a checkout
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    log(f"HF transformers {transformers.__version__}, {torch.get_num_threads()} torch threads: "
        f"loading {target.name} and {draft.name if draft else PROMPT_LOOKUP}")
    target_model = _load(target, device, dtype)
    assistant = _load(draft, device, dtype) if draft is not None else PROMPT_LOOKUP
    modes = ((HF_TARGET, None), (HF_ASSISTED, assistant))
    pooled = {kind: ([], 0.0) for kind, _ in modes}
    for kind, assistant in modes:
        _generate(target_model, prompts[0], WARMUP_TOKENS, assistant)
    bar = progress(total=repeats * len(modes) * len(prompts), desc="HF requests", unit="req",
                   quiet=quiet)
    for _ in range(repeats):
        for kind, assistant in modes:
            bar.set_postfix_str(kind)
            start = time.perf_counter()
            samples = []
            for i, p in enumerate(prompts):
                samples.append(_timed(target_model, i, p, max_new_tokens, assistant))
                bar.update(1)
            pooled[kind] = (pooled[kind][0] + samples,
                            pooled[kind][1] + time.perf_counter() - start)
    bar.close()
    runs = []
    for kind, (samples, wall) in pooled.items():
        label = (draft.name if draft else PROMPT_LOOKUP) if kind == HF_ASSISTED else ""
        run = summarise("hf", kind, label, 1, samples, wall)
        log(f"{run.row.label}: {len(samples)} requests, {run.row.tokens_per_s:.1f} tok/s")
        runs.append(run)
    return runs
