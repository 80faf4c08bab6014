"""In-process engine bench: forward time by row count, next to the weight-streaming bound.

    python -m specmesh.kernels.bench_forward [--target DIR --draft DIR] [--rows 1,2,5,9,17] [--json]

For the target: one packed forward of 1 causal token + (rows - 1) chain-tree nodes over a
128-token committed prefix (a verify step; rows = 1 is a plain decode step). For the draft: a
1-row and a 3-row forward (one depth of a chain / of a dynamic tree), its projections in int8
as the draft service serves them on a CPU (`--draft-quantize none`: fp16). Each is printed next to the
bound measured on this machine in the same run: one sweep over the model's projection weights,
as served (fp16 through `kernels.cpu_linear` where the checkpoint is fp16, else fp32 `F.linear`;
on a GPU `F.linear` in the serving dtype, replayed as one CUDA graph), with one row, i.e. weight bytes / sweep time. Modes are interleaved and the
minimum and median of `--repeats` are reported (the machine may be shared). Each forward also
shows its projections' arithmetic rate (2 x multiply-adds / its time): where that nears the
cores' FMA peak, extra rows cost their FLOPs, not another sweep.

On a GPU (`--device cuda --dtype bfloat16`) every case is timed to a `torch.cuda.synchronize()`
and the sweep is one `F.linear` per weight; the forwards run as the services run them (CUDA
graphs where `kernels.cuda_graphs` captures them, SPECMESH_CUDA_GRAPHS=0 for eager).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from specmesh.kernels import weight_arena
from specmesh.kernels.cpu_linear import linear_f16, linear_q8
from specmesh.kernels.kv_cache import PagedKVCache
from specmesh.kernels.loader import LoadedModel, load_model
from specmesh.kernels.runner import ForwardItem, ModelRunner
from specmesh.kernels.tree import compile_tree

PREFIX = 128


def _default(name: str) -> pathlib.Path:
    base = os.environ.get("SPECMESH_MODEL_DIR")
    root = pathlib.Path(base) if base else pathlib.Path(__file__).resolve().parents[2] / "shared" / "models"
    return root / name


def _weights(loaded: LoadedModel) -> list[tuple[torch.Tensor, int, torch.Tensor | None]]:
    """The projection weights as served, each with its output count and int8 scales: fp16
    panels where `kernels.linear.attach_f16` kept them so, int8 panels (and their scales)
    where `attach_q8` did, else the plain weight."""
    out = []
    for m in loaded.model.modules():
        if isinstance(m, torch.nn.Linear):
            q8, f16 = getattr(m, "weight_q8", None), getattr(m, "weight_f16", None)
            if q8 is not None:
                out.append((q8, m.out_features, m.weight_scale))
            elif f16 is not None:
                out.append((f16, m.out_features, None))
            elif m.weight.numel():
                out.append((m.weight, m.out_features, None))
    return out


def _runner(loaded: LoadedModel) -> ModelRunner:
    cfg = loaded.config
    kv = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16,
                      (PREFIX + 64) // 16 + 1 + 80, loaded.dtype, loaded.device)  # + graphs' scratch
    runner = ModelRunner(loaded, kv)
    kv.create("s")
    kv.reserve("s", PREFIX + 32)
    runner.forward([ForwardItem("s", [1 + i % 200 for i in range(PREFIX)])])
    return runner


def _step(runner: ModelRunner, rows: int):
    """A verify-shaped forward: 1 causal token + a chain of rows - 1 tree nodes."""
    n = rows - 1
    tree = compile_tree(list(range(5, 5 + n)), list(range(-1, n - 1))) if n else None

    def run() -> None:
        runner.kv.set_num_tokens("s", PREFIX)
        runner.forward([ForwardItem("s", [7], tree)])
    return run


def _sweep(loaded: LoadedModel):
    weights = _weights(loaded)
    xs = {w.shape[1]: torch.randn(1, w.shape[1], device=w.device) for w, _, _ in weights}
    stream = weight_arena.streamed(sum(w.nbytes for w, _, _ in weights))  # as the forward does

    def run() -> None:
        with torch.inference_mode():
            for w, n, scale in weights:
                if w.dtype == torch.int8:
                    linear_q8(xs[w.shape[1]], w, scale, stream=stream)
                elif w.dtype == torch.float16 and w.device.type == "cpu":
                    linear_f16(xs[w.shape[1]], w, n, stream=stream)
                else:
                    F.linear(xs[w.shape[1]].to(w.dtype), w)
    if loaded.device.type != "cuda":
        return run
    run()  # on a GPU: one captured graph, so the bound is the memory's, not the launches'
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def _time(cases: dict[str, object], repeats: int, device: torch.device) -> dict[str, list[float]]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in cases.values():
        fn()  # warm-up
        fn()
    out: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            out[name].append((time.perf_counter() - start) * 1000)
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    dtype = getattr(torch, args.dtype)
    target = load_model(args.target, dtype, args.device)
    draft = load_model(args.draft, dtype, args.device, quantize=args.draft_quantize)
    tr, dr = _runner(target), _runner(draft)
    cases = {"target sweep": _sweep(target), "draft sweep": _sweep(draft)}
    cases |= {f"target rows={r}": _step(tr, r) for r in args.rows}
    cases |= {"draft rows=1": _step(dr, 1), "draft rows=3": _step(dr, 3)}
    times = _time(cases, args.repeats, target.device)
    stats = {k: {"min_ms": min(v), "median_ms": statistics.median(v)} for k, v in times.items()}
    bytes_ = {m: sum(w.nbytes for w, _, _ in _weights(x))  # as streamed (panels' padding too)
              for m, x in (("target", target), ("draft", draft))}
    params = {m: sum(n * w.shape[1] for w, n, _ in _weights(x))  # multiply-adds per row
              for m, x in (("target", target), ("draft", draft))}
    result = {"threads": torch.get_num_threads(), "prefix": PREFIX, "device": args.device,
              "dtype": args.dtype, "draft_quantize": args.draft_quantize, "weight_bytes": bytes_,
              "projection_params": params, "times": stats, "ratios": {}, "gflop_s": {}}
    base = stats["target rows=1"]["median_ms"]
    for name, t in stats.items():  # the projections' arithmetic rate (where rows = compute)
        if "rows=" in name:
            rows, model = int(name.split("rows=")[1]), name.split()[0]
            result["gflop_s"][name] = 2 * params[model] * rows / t["median_ms"] / 1e6
    for r in args.rows:
        result["ratios"][f"target rows={r} / rows=1"] = stats[f"target rows={r}"]["median_ms"] / base
    for m in ("target", "draft"):
        sweep = stats[f"{m} sweep"]["median_ms"]
        result["ratios"][f"{m} rows=1 / sweep"] = stats[f"{m} rows=1"]["median_ms"] / sweep
        result[f"{m}_stream_gb_s"] = bytes_[m] / sweep / 1e6
    return result


def format_table(res: dict) -> str:
    lines = [f"engine bench: {res['device']} {res['dtype']} (draft projections "
             f"{res.get('draft_quantize', 'none')}), {res['threads']} threads, "
             f"{res['prefix']}-token prefix",
             f"{'case':<22}{'min ms':>9}{'median ms':>11}{'x sweep':>9}{'x rows=1':>10}"
             f"{'GFLOP/s':>9}"]
    for name, s in res["times"].items():
        model = name.split()[0]
        sweep = res["times"][f"{model} sweep"]["median_ms"]
        one = res["times"].get(f"{model} rows=1", {}).get("median_ms")
        rel = f"{s['median_ms'] / one:>10.2f}" if one and "rows=" in name else f"{'':>10}"
        rate = res.get("gflop_s", {}).get(name)
        lines.append(f"{name:<22}{s['min_ms']:>9.2f}{s['median_ms']:>11.2f}"
                     f"{s['median_ms'] / sweep:>9.2f}{rel}"
                     + (f"{rate:>9.1f}" if rate is not None else ""))
    for m in ("target", "draft"):
        lines.append(f"{m}: {res['weight_bytes'][m] / 1e6:.0f} MB of weights, "
                     f"one sweep streams {res[f'{m}_stream_gb_s']:.1f} GB/s")
    lines.append("GFLOP/s: the projections' multiply-adds x 2 / the whole forward's time (where "
                 "it nears the cores' FMA peak, rows cost their arithmetic, not the sweep)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specmesh.kernels.bench_forward", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=pathlib.Path, default=_default("stories260K-wide78M"))
    p.add_argument("--draft", type=pathlib.Path, default=_default("stories260K-draft2L-wide5M"))
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 2, 5, 9, 17])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU")
    p.add_argument("--draft-quantize", default="int8", choices=("none", "int8"),
                   help="the draft's projection weights, as the draft service serves them "
                        "(default int8; CPU only, a GPU keeps the dtype)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="load both models as this dtype (CPU: float32, the fp16 checkpoints' "
                        "weights stay fp16 for the CPU kernel)")
    args = p.parse_args(argv)
    if 1 not in args.rows:
        args.rows = [1] + args.rows
    res = run(args)
    print(json.dumps(res) if args.json else format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
