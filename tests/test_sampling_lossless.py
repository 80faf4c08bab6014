"""Statistical losslessness end to end (draft + verify engines, tiny pair, batched in-process).

The distribution of the first two generated tokens, and of the token right after a rejection,
must equal the target's distribution computed independently with HF transformers' warpers:
chi-square p > 0.01 and total variation < 0.03 over 20,000 samples each.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from specmesh.draft_service.engine import DraftEngine, ProposeItem
from specmesh.kernels import load_model
from specmesh.kernels.sampling import SamplingConfig
from specmesh.model_service.config import EngineConfig
from specmesh.verify_service.engine import VerifyEngine, VerifyItem
from specmesh.wire.tree_spec import TreeSpec
from tests.conftest import TINY_DRAFT, TINY_TARGET

pytestmark = [pytest.mark.models, pytest.mark.slow]
PROMPT = [1, 385, 328, 432, 261]  # "One day, a": a high-entropy next token
NUM_SAMPLES = 20_000
BATCH = 2_000
CONFIG = SamplingConfig(temperature=1.0, top_p=0.95, top_k=6)


def hf_target_pairs(folder, prompt: list[int] = PROMPT) -> dict[tuple[int, int], float]:
    """P(t1, t2) of the target with HF's own warpers (temperature, top-k, top-p), nothing of ours."""
    from transformers import AutoModelForCausalLM
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    warp = LogitsProcessorList([TemperatureLogitsWarper(CONFIG.temperature),
                                TopKLogitsWarper(CONFIG.top_k), TopPLogitsWarper(CONFIG.top_p)])
    with torch.no_grad():
        ids = torch.tensor([prompt])
        p1 = torch.softmax(warp(ids, model(ids).logits[:, -1]).double(), -1)[0]
        firsts = torch.nonzero(p1).squeeze(-1)
        ids2 = torch.cat([ids.repeat(len(firsts), 1), firsts[:, None]], 1)
        p2 = torch.softmax(warp(ids2, model(ids2).logits[:, -1]).double(), -1)
    return {(int(a), int(b)): float(p1[a] * p2[i, b])
            for i, a in enumerate(firsts) for b in torch.nonzero(p2[i]).squeeze(-1).tolist()}


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny per-sequence ops: OpenMP wake-ups would dominate with 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sample_pairs(models, spec: TreeSpec, draft=None, prompt: list[int] = PROMPT,
                 num_samples: int = NUM_SAMPLES):
    """Generate `num_samples` two-token continuations; also collect (t1, t2) after rejections.
    `draft`: anything with propose_batch/release (default: the tiny draft model's engine)."""
    if draft is None:
        draft = DraftEngine(load_model(models / TINY_DRAFT), EngineConfig(kv_cache_mb=256))
    target = VerifyEngine(load_model(models / TINY_TARGET), EngineConfig(kv_cache_mb=256))
    pairs, after_rejection = [], []
    for start in range(0, num_samples, BATCH):
        seqs = {f"s{i}": list(prompt) for i in range(start, start + min(BATCH, num_samples))}
        cached = {s: (0, 0) for s in seqs}  # (draft, target)
        rejected = {s: False for s in seqs}
        while any(len(t) < len(prompt) + 2 for t in seqs.values()):
            live = [s for s, t in seqs.items() if len(t) < len(prompt) + 2]
            seed = {s: int(s[1:]) for s in live}
            props = draft.propose_batch([
                ProposeItem(s, cached[s][0], seqs[s][cached[s][0]:], spec, CONFIG, seed[s])
                for s in live])
            outs = target.verify_batch([
                VerifyItem(s, cached[s][1], seqs[s][cached[s][1]:], p.tokens, p.parents,
                           p.draft_dists, CONFIG, seed[s])
                for s, p in zip(live, props)])
            for s, p, o in zip(live, props, outs):
                first_round = len(seqs[s]) == len(prompt)
                seqs[s].extend(o.tokens)
                cached[s] = (p.num_cached_tokens, o.num_cached_tokens)
                if first_round and len(o.tokens) == 1 and p.tokens:
                    rejected[s] = True  # t1 was recovered after rejecting the whole first level
        draft.release(list(seqs))
        target.release(list(seqs))
        for s, t in seqs.items():
            pairs.append((t[len(prompt)], t[len(prompt) + 1]))
            if rejected[s]:
                after_rejection.append(pairs[-1])
    return pairs, after_rejection


def check(observed: list, expected: dict, min_expected: float = 5.0):
    """Chi-square over cells with >= min_expected counts (the rest lumped), and TV distance."""
    n = len(observed)
    counts = Counter(observed)
    keys = [k for k, p in expected.items() if p * n >= min_expected]
    exp = np.array([expected[k] * n for k in keys] + [n - sum(expected[k] * n for k in keys)])
    obs = np.array([counts.get(k, 0) for k in keys] + [n - sum(counts.get(k, 0) for k in keys)])
    if exp[-1] < min_expected:
        exp, obs = exp[:-1], obs[:-1]
        obs = obs * exp.sum() / obs.sum()
    p_value = stats.chisquare(obs, exp).pvalue
    support = set(expected) | set(counts)
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - expected.get(k, 0.0)) for k in support)
    unexpected = [k for k in counts if expected.get(k, 0.0) == 0.0]
    return p_value, tv, unexpected


@pytest.fixture(scope="module")
def target_pairs(models):
    return hf_target_pairs(models / TINY_TARGET)


@pytest.mark.parametrize("spec", ["chain:3", "static:3,2", "dynamic:6/3"])
def test_first_two_tokens_follow_the_target(models, target_pairs, spec):
    pairs, after_rejection = sample_pairs(models, TreeSpec.parse(spec))
    p_value, tv, unexpected = check(pairs, target_pairs)
    assert not unexpected, f"tokens outside the target's support: {unexpected[:5]}"
    assert p_value > 0.01 and tv < 0.03, (p_value, tv)
    # t2 right after a rejection: P(t2 | t1) must be the target's, for the commonest t1
    t1 = Counter(a for a, _ in after_rejection).most_common(1)[0][0]
    seconds = [b for a, b in after_rejection if a == t1]
    cond = {b: p for (a, b), p in target_pairs.items() if a == t1}
    total = sum(cond.values())
    p_value, tv, _ = check(seconds, {b: p / total for b, p in cond.items()})
    assert len(seconds) > 200 and p_value > 0.01, (len(seconds), p_value)


def _int8_draft(models):
    """The 5M stand-in draft with int8 projections (the draft service's default) drafting for
    the tiny target (same vocabulary): its proposals differ from the target's model, the
    output distribution must not."""
    from specmesh.kernels import load_for_service

    loaded = load_for_service(models / "stories260K-draft2L-wide5M", "float32", "cpu", 1,
                              quantize="int8")
    assert loaded.model.model.layers[0].mlp.down_proj.weight_q8 is not None
    return DraftEngine(loaded, EngineConfig(kv_cache_mb=256))


@pytest.mark.parametrize("spec", ["chain:3", "dynamic:6/3"])
def test_an_int8_draft_keeps_the_target_distribution(models, target_pairs, spec):
    """(tests/test_sampling_int8_draft.py runs a CI-sized version by default). Its chains run
    through the C chain, where a dynamic tree is a spine and its leaves (`spine_leaves`)."""
    check_int8_draft(models, target_pairs, NUM_SAMPLES, max_tv=0.03, spec=spec)


def check_int8_draft(models, target_pairs, num_samples: int, max_tv: float,
                     spec: str = "chain:3") -> None:
    pairs, _ = sample_pairs(models, TreeSpec.parse(spec), draft=_int8_draft(models),
                            num_samples=num_samples)
    p_value, tv, unexpected = check(pairs, target_pairs)
    assert not unexpected, f"tokens outside the target's support: {unexpected[:5]}"
    assert p_value > 0.01 and tv < max_tv, (p_value, tv)
