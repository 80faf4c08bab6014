"""Render benchmark results: a text table with ratios and notes, one JSON object, a PNG plot."""

from __future__ import annotations

import pathlib

from specmesh.loadtest.bench_results import BenchRow, OutputCheck, Ratio

HEADER = ("mode", "conc", "reqs", "tokens/s", "lat p50 s", "lat p95 s", "TTFT p50 s",
          "acc/round", "tok/round")

NOTES = [
    "greedy, ignore_eos: every request makes exactly max_new_tokens tokens",
    "tokens/s = all generated tokens / wall time of the level (closed loop, c in flight)",
    "latency = whole request; TTFT = first streamed token; acc/round = accepted draft tokens per "
    "target forward (excl. the bonus token); tok/round = generated tokens per target forward",
    "HF rows: transformers generate, sequential (concurrency 1): assisted generation "
    "(assistant_model=) supports batch size 1 only; its draft length follows HF's default "
    "heuristic schedule",
]


def _cells(row: BenchRow) -> list[str]:
    acc = "-" if row.mean_accepted_per_round is None else f"{row.mean_accepted_per_round:.2f}"
    return [row.mode, str(row.concurrency), str(row.num_requests), f"{row.tokens_per_s:.1f}",
            f"{row.latency_p50_s:.3f}", f"{row.latency_p95_s:.3f}", f"{row.ttft_p50_s:.3f}",
            acc, f"{row.tokens_per_round:.2f}"]


def format_table(rows: list[BenchRow]) -> str:
    table = [list(HEADER)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    out = []
    for n, line in enumerate(table):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_report(title: str, rows: list[BenchRow], ratios: list[Ratio], check: OutputCheck,
                  checks: dict[str, bool], exact: bool = True) -> str:
    lines = [title, "", format_table(rows), "", "ratios (tokens/s):"]
    width = max((len(r.name) for r in ratios), default=0)
    lines += [f"  {r.name.ljust(width)}  {r.value:6.2f}x" for r in ratios]
    for name, ok in checks.items():
        lines.append(f"  {name}: {'yes' if ok else 'NO'}")
    lines += ["", "notes:"] + [f"  - {n}" for n in NOTES] + [""]
    if check.total == 0 and not exact:
        lines.append("outputs: sampled (seeded), so only lengths are checked here; losslessness "
                     "is tested statistically (tests/test_sampling_lossless.py)")
    elif check.total == 0:
        versus = "" if check.uncounted else ", and vs HF"
        lines.append("outputs: all identical token for token (speculative == target-only, "
                     f"across concurrencies{versus})")
    else:
        lines.append(f"!!! {check.total} OUTPUT MISMATCHES: "
                     + ", ".join(f"{k}={v}" for k, v in check.counts.items() if v))
        lines += [f"!!!   {d}" for d in check.details]
    if check.uncounted:
        lines.append(f"HF in this dtype (not counted: its kernels round differently from ours, "
                     f"so greedy decoding may part at a near tie): {len(check.uncounted)} differ")
        lines += [f"    {d}" for d in check.uncounted]
    return "\n".join(lines)


def to_json(config: dict, rows: list[BenchRow], ratios: list[Ratio], check: OutputCheck,
            checks: dict[str, bool]) -> dict:
    return {"config": config, "rows": [r.to_json() for r in rows],
            "ratios": {r.name: r.to_json() for r in ratios}, "checks": checks,
            "mismatches": check.to_json(), "notes": NOTES}


def write_plot(path: pathlib.Path, title: str, rows: list[BenchRow]) -> None:
    """tokens/s vs concurrency, one line per specmesh mode; HF runs as markers at c=1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    modes = list(dict.fromkeys(r.mode for r in rows if r.system == "specmesh"))
    for mode in modes:
        pts = sorted((r.concurrency, r.tokens_per_s) for r in rows if r.mode == mode)
        ax.plot(*zip(*pts), marker="o", label=mode)
    for r, marker in zip([r for r in rows if r.system == "hf"], ("s", "D", "^", "v")):
        ax.plot([r.concurrency], [r.tokens_per_s], marker=marker, linestyle="none",
                markersize=9, label=f"{r.mode} (batch 1)")
    concs = sorted({r.concurrency for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(concs, [str(c) for c in concs])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
