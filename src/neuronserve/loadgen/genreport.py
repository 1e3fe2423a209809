"""The report of a generative run: requests.csv (one row per request), summary.json (every
step's figures), report.md with the decision line, and plots: latency per token against
throughput with the knee marked, TTFT and TPOT against the load."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from neuronserve.loadgen.genstats import GenStep, to_json
from neuronserve.loadgen.sse import StreamRecord

CSV_FIELDS = (
    "step", "mode", "level", "index", "intended_s", "sent_s", "status", "error", "ttft_ms", "tpot_ms",
    "e2el_ms", "itl_count", "itl_mean_ms", "output_tokens", "tokens_from", "prompt_tokens", "chunks",
    "finish_reason", "detail",
)  # fmt: skip


def _ms(seconds: float) -> str:
    return "" if math.isnan(seconds) else f"{seconds * 1000:.3f}"


def write_requests(path: Path, rows: list[tuple[int, StreamRecord]], steps: list[GenStep]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_FIELDS)
        for index, r in rows:
            itl_mean = sum(r.itl_s) / len(r.itl_s) if r.itl_s else math.nan
            writer.writerow([
                index, steps[index].mode, steps[index].level, r.index, f"{r.intended_s:.6f}", f"{r.sent_s:.6f}",
                r.status, r.error, _ms(r.ttft_s), _ms(r.tpot_s), _ms(r.e2el_s), len(r.itl_s), _ms(itl_mean),
                r.output_tokens, r.tokens_from, r.prompt_tokens, r.chunks, r.finish_reason, r.detail,
            ])  # fmt: skip


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def steps_table(steps: list[GenStep], knee_index: int | None, best: int | None) -> str:
    unit = "concurrency" if steps and steps[0].mode == "closed" else "rate (req/s)"
    rows = [
        f"| {unit} | out tok/s | req/s | TTFT p50 / p95 ms | TPOT p50 / p95 ms | ITL p50 / p99 ms | "
        "E2EL p50 ms | goodput req/s | errors | $/1M out tok | server TTFT p50 ms | server ITL p50 ms | |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(steps):
        mark = " ".join(m for m, on in (("knee", i == knee_index), ("best", i == best)) if on)
        errors = ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) or "0"
        server_ttft = s.server.get("ttft_ms", {}).get("p50") if s.server else None
        server_itl = s.server.get("itl_ms", {}).get("p50") if s.server else None
        rows.append(
            f"| {s.level:g} | {s.output_tokens_per_s:.1f} | {s.request_throughput:.2f} | "
            f"{_f(s.ttft_ms['p50'], 0)} / {_f(s.ttft_ms['p95'], 0)} | {_f(s.tpot_ms['p50'])} / {_f(s.tpot_ms['p95'])} | "
            f"{_f(s.itl_ms['p50'])} / {_f(s.itl_ms['p99'])} | {_f(s.e2el_ms['p50'], 0)} | {_f(s.goodput_per_s, 2)} | "
            f"{errors} ({s.error_rate:.1%}) | {_f(s.cost_per_million_output_tokens, 2)} | {_f(server_ttft, 0)} | "
            f"{_f(server_itl)} | {mark} |"
        )
    return "\n".join(rows)


def plot(directory: Path, steps: list[GenStep], knee_index: int | None, budget_ms: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neuronserve.loadgen.report import _save

    xlabel = "concurrency" if steps and steps[0].mode == "closed" else "offered rate (req/s)"
    names = []
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [s.output_tokens_per_s for s in steps]
    ys = [s.tpot_ms["p50"] for s in steps]
    ax.plot(xs, ys, "o-")
    for s, x, y in zip(steps, xs, ys, strict=True):
        ax.annotate(f"{s.level:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if knee_index is not None:
        k = steps[knee_index]
        ax.plot([xs[knee_index]], [ys[knee_index]], "r*", markersize=16, label=f"knee ({xlabel} {k.level:g})")
    if budget_ms:
        ax.axhline(budget_ms, color="grey", linestyle="--", label=f"budget {budget_ms:g} ms/token")
    if knee_index is not None or budget_ms:
        ax.legend()
    ax.set(
        xlabel="output tokens/s",
        ylabel="latency per token, p50 TPOT (ms)",
        title="Latency per token vs throughput",
    )
    names.append(_save(fig, ax, directory / "tpot_vs_throughput.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    levels = [s.level for s in steps]
    for q in ("p50", "p95"):
        left.plot(levels, [s.ttft_ms[q] for s in steps], "o-", label=q)
        right.plot(levels, [s.tpot_ms[q] for s in steps], "o-", label=q)
    left.set(xlabel=xlabel, ylabel="TTFT (ms)", title="Time to first token")
    right.set(xlabel=xlabel, ylabel="TPOT (ms)", title="Time per output token")
    left.legend()
    right.legend()
    left.grid(alpha=0.3)
    names.append(_save(fig, right, directory / "ttft_tpot.png"))
    return names


def write_report(directory: Path, summary: dict[str, Any], steps: list[GenStep], figures: list[str]) -> Path:
    c = summary["config"]
    lines = [
        f"# {summary['name']}: {c['api']} at {', '.join(c['targets'])}",
        "",
        f"**Decision:** {summary['decision']['verdict']}",
        "",
        f"Model {c['model']}; {c['prompts']}; {c['num_prompts']} requests per step, {c['mode']} loop; "
        f"budgets: p95 TTFT {c['budgets']['ttft_p95_ms'] or 'none'} ms, p95 TPOT "
        f"{c['budgets']['tpot_p95_ms'] or 'none'} ms, error rate {c['budgets']['error_rate']:.1%}"
        + (f"; goodput SLOs {c['slo']}" if c.get("slo") else "")
        + (
            f"; {c['instance_count']} x {c['instance_type']} at ${c['dollars_per_hour']:.4f}/h"
            if c.get("dollars_per_hour")
            else ""
        ),
        "",
        steps_table(steps, summary["knee"], summary["decision"]["best"]),
        "",
        "TTFT: first content chunk - sent; TPOT: (E2EL - TTFT) / (output tokens - 1); ITL: every gap between "
        "content chunks; E2EL: last content chunk - sent; output tokens from the server's usage "
        f"({_tokens_from(steps)}); goodput: requests meeting every SLO per second. Server columns: the "
        "engines' own histograms (vllm:*), summed over copies, for the same step.",
        "",
    ]
    for step in steps:
        server = step.server
        if server and server.get("generation_tokens") is not None:
            agree = "equal" if server["generation_tokens"] == step.output_tokens else "DIFFERENT"
            lines.append(
                f"- {step.mode} {step.level:g}: output tokens client {step.output_tokens}, engines "
                f"{server['generation_tokens']} ({agree}; {server['copies']} copies answered)"
            )
        for note in step.notes:
            lines.append(f"- {step.mode} {step.level:g}: {note}")
    if summary["decision"]["reasons"]:
        lines += ["", "Why no step qualified:"]
        lines += [f"- {k}: {'; '.join(v)}" for k, v in summary["decision"]["reasons"].items()]
    lines += ["", *(f"![{f}]({f})" for f in figures), ""]
    path = directory / "report.md"
    path.write_text("\n".join(lines))
    return path


def _tokens_from(steps: list[GenStep]) -> str:
    sources: dict[str, int] = {}
    for s in steps:
        for k, v in s.tokens_from.items():
            sources[k] = sources.get(k, 0) + v
    return ", ".join(f"{k or 'none'} {v}" for k, v in sorted(sources.items())) or "no request completed"


def write_all(
    directory: Path, summary: dict[str, Any], steps: list[GenStep], rows: list[tuple[int, StreamRecord]]
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_requests(directory / "requests.csv", rows, steps)
    summary["steps"] = to_json(steps)
    (directory / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    figures = plot(directory, steps, summary["knee"], summary["config"]["budgets"]["tpot_p95_ms"])
    return write_report(directory, summary, steps, figures)


def compare(a: dict[str, Any], b: dict[str, Any], threshold: float = 0.10) -> str:
    """Step by step (matched by mode and level): output tokens/s, median TTFT and TPOT."""
    index_b = {(s["mode"], s["level"]): s for s in b["steps"]}
    rows = [
        f"{'step':<16}{'tok/s A':>9}{'tok/s B':>9}{'change':>9}{'TTFT A':>9}{'TTFT B':>9}{'change':>9}"
        f"{'TPOT A':>9}{'TPOT B':>9}{'change':>9}  verdict"
    ]
    for s in a["steps"]:
        o = index_b.get((s["mode"], s["level"]))
        name = f"{s['mode']} {s['level']:g}"
        if o is None:
            rows.append(f"{name:<16}  only in A")
            continue

        def change(x: float, y: float) -> float:
            return (y - x) / x if x else math.nan

        d_tok = change(s["output_tokens_per_s"], o["output_tokens_per_s"])
        d_ttft = change(s["ttft_ms"]["p50"], o["ttft_ms"]["p50"])
        d_tpot = change(s["tpot_ms"]["p50"], o["tpot_ms"]["p50"])
        worse = (
            d_tok < -threshold
            or d_ttft > threshold
            or d_tpot > threshold
            or o["error_rate"] > s["error_rate"] + 0.001
        )
        better = d_tok > threshold or d_ttft < -threshold or d_tpot < -threshold
        verdict = "REGRESSION" if worse else "improvement" if better else "same"
        rows.append(
            f"{name:<16}{s['output_tokens_per_s']:>9.1f}{o['output_tokens_per_s']:>9.1f}{d_tok:>+9.1%}"
            f"{s['ttft_ms']['p50']:>9.0f}{o['ttft_ms']['p50']:>9.0f}{d_ttft:>+9.1%}"
            f"{s['tpot_ms']['p50']:>9.1f}{o['tpot_ms']['p50']:>9.1f}{d_tpot:>+9.1%}  {verdict}"
        )
    return "\n".join(rows)
