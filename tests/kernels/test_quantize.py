"""int8 draft weights (`kernels/quantize.py`, `specmesh_linear_q8` in csrc/linear_f16.c): exact
on tiny exact tensors, equal to F.linear over the dequantized weights up to summation order,
batch-invariant, and served by a model loaded with quantize="int8"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specmesh.kernels import cpu_linear
from specmesh.kernels.linear import attach_q8, project
from specmesh.kernels.quantize import dequantize_rows, quantize_rows

needs_kernel = pytest.mark.skipif(not cpu_linear.available(), reason="CPU kernels unavailable")


def test_rows_are_scaled_by_their_largest_magnitude():
    w = torch.tensor([[1.27, -0.64, 0.0], [0.0, 0.0, 0.0], [-2.54, 1.0, 0.5]])  # [N=3, K=3]
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.allclose(scale, torch.tensor([0.01, 0.0, 0.02]))
    assert q.tolist() == [[127, -64, 0], [0, 0, 0], [-127, 50, 25]]
    assert torch.allclose(dequantize_rows(q, scale), w, atol=0.01)  # within half a step


def test_the_error_is_at_most_half_a_step():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_rows(w)
    assert int(q.abs().max()) == 127
    assert bool(((dequantize_rows(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-7).all())


@needs_kernel
def test_exact_small_integers_with_unit_scales():
    q = (torch.arange(3 * 32).reshape(3, 32) % 7 - 3).to(torch.int8)  # [N=3, K=32]
    x = torch.stack([torch.ones(32), torch.arange(32.0)])  # [M=2, K=32]
    got = cpu_linear.linear_q8(x, cpu_linear.pack_panels(q), torch.ones(3),
                               bias=torch.tensor([0.5, 0.0, -1.0]))
    assert torch.equal(got, x @ q.float().t() + torch.tensor([0.5, 0.0, -1.0]))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 8, 9, 13, 16, 17])
@pytest.mark.parametrize("shape", [(37, 80), (200, 90)])
def test_equals_f_linear_of_the_dequantized_weight_and_is_batch_invariant(rows, shape):
    gen = torch.Generator().manual_seed(rows)
    q, scale = quantize_rows(torch.randn(*shape, generator=gen))  # panel tails of 3 and 1
    x = torch.randn(rows, shape[1], generator=gen)  # [M, K]
    panels = cpu_linear.pack_panels(q)
    got = cpu_linear.linear_q8(x, panels, scale)
    assert torch.allclose(got, F.linear(x, dequantize_rows(q, scale)), rtol=1e-5, atol=1e-5)
    for m in range(rows):  # each row alone: bitwise what it was in the batch
        assert torch.equal(cpu_linear.linear_q8(x[m:m + 1], panels, scale), got[m:m + 1])


@needs_kernel
def test_attached_layer_projects_with_its_int8_rows():
    layer = nn.Linear(32, 20, bias=True)
    want_w = dequantize_rows(*quantize_rows(layer.weight.detach()))
    assert attach_q8(layer)
    assert layer.weight.numel() == 0 and layer.weight_q8.shape == (1, 32, 64)  # one panel
    x = torch.randn(3, 32)
    assert torch.allclose(project(layer, x), F.linear(x, want_w, layer.bias.detach()),
                          rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_draft_loaded_in_int8_serves_int8_through_the_fused_layers(models):
    from specmesh.kernels import load_for_service

    plain = load_for_service(models / "stories260K-draft2L-wide5M", "float32", "cpu", None)
    int8 = load_for_service(models / "stories260K-draft2L-wide5M", "float32", "cpu", None,
                            quantize="int8")
    layer = int8.model.model.layers[0]
    assert layer.mlp.down_proj.weight_q8.dtype == torch.int8
    assert int8.model.fused_layers is not None  # the C layers agree with the op path
    assert int8.fingerprint != plain.fingerprint  # its prefix KV is its own


def test_the_draft_service_defaults_to_int8_and_the_verifier_refuses_it(models):
    import asyncio

    from specmesh.draft_service.__main__ import SPEC as DRAFT
    from specmesh.model_service.config import ModelServiceConfig, parse_service_args
    from specmesh.model_service.startup import build_servicer
    from specmesh.verify_service.__main__ import SPEC as VERIFY

    target = str(models / "stories260K")
    assert parse_service_args("draft", ["--model", target], DRAFT.defaults).quantize == "int8"
    assert parse_service_args("verify", ["--model", target], VERIFY.defaults).quantize == "none"
    with pytest.raises(ValueError, match="quantize"):
        ModelServiceConfig(model=target, quantize="int4")
    with pytest.raises(ValueError, match="--quantize int8: for the draft service only"):
        asyncio.run(build_servicer(VERIFY, ModelServiceConfig(model=target, quantize="int8")))
