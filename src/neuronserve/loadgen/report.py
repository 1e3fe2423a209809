"""The report of a run: requests.csv, summary.json, report.md and PNG plots; and comparisons."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from neuronserve.loadgen.http import Record
from neuronserve.loadgen.stats import StepSummary, to_json

RECORD_FIELDS = list(Record.__dataclass_fields__)


def write_requests(path: Path, rows: list[tuple[int, Record]], steps: list[StepSummary]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "mode", "level", *RECORD_FIELDS])
        for index, record in rows:
            values = asdict(record)
            writer.writerow(
                [index, steps[index].mode, steps[index].level, *(values[f] for f in RECORD_FIELDS)]
            )


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def steps_table(steps: list[StepSummary], knee_index: int | None, best: int | None) -> str:
    unit = "concurrency" if steps and steps[0].mode == "closed" else "rate (req/s)"
    rows = [
        f"| {unit} | req/s | p50 ms | p90 ms | p95 ms | p99 ms | max ms | errors | queue ms | inference ms | batch | client CPU | $/M req | |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(steps):
        mark = " ".join(m for m, on in (("knee", i == knee_index), ("best", i == best)) if on)
        errors = ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) or "0"
        rows.append(
            f"| {s.level:g} | {s.rps:.1f} | {_fmt(s.latency_ms['p50'])} | {_fmt(s.latency_ms['p90'])} | "
            f"{_fmt(s.latency_ms['p95'])} | {_fmt(s.latency_ms['p99'])} | {_fmt(s.latency_ms['max'])} | "
            f"{errors} ({s.error_rate:.1%}) | {_fmt(s.server_queue_ms['p50'], 2)} | {_fmt(s.server_inference_ms['p50'], 2)} | "
            f"{_fmt(s.mean_batch_size)} | {s.client_cpu_percent:.0f}% | {_fmt(s.cost_per_million, 3)} | {mark} |"
        )
    return "\n".join(rows)


def _save(fig: Any, ax: Any, path: Path, grid_axis: str = "both") -> str:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3, axis=grid_axis)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot(
    directory: Path,
    steps: list[StepSummary],
    rows: list[tuple[int, Record]],
    knee_index: int | None,
    token_unit: str,
) -> list[str]:
    """The report's figures; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [s.level for s in steps]
    xlabel = "concurrency" if steps and steps[0].mode == "closed" else "offered rate (req/s)"
    names = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s.rps for s in steps], [s.latency_ms["p95"] for s in steps], "o-")
    for s in steps:
        ax.annotate(
            f"{s.level:g}",
            (s.rps, s.latency_ms["p95"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    if knee_index is not None:
        k = steps[knee_index]
        ax.plot([k.rps], [k.latency_ms["p95"]], "r*", markersize=16, label=f"knee ({xlabel} {k.level:g})")
        ax.legend()
    ax.set(xlabel="throughput (req/s)", ylabel="p95 latency (ms)", title="Throughput vs p95 latency")
    names.append(_save(fig, ax, directory / "throughput_vs_p95.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for q in ("p50", "p95", "p99"):
        ax.plot(levels, [s.latency_ms[q] for s in steps], "o-", label=q)
    ax.set(xlabel=xlabel, ylabel="latency (ms)", title="Latency percentiles")
    ax.legend()
    names.append(_save(fig, ax, directory / "latency_percentiles.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ok = [(r.tokens, r.latency_s * 1000) for _i, r in rows if not r.error]
    if ok:
        ax.scatter([t for t, _ in ok], [lat for _, lat in ok], s=4, alpha=0.3)
    ax.set(xlabel=f"input {token_unit}", ylabel="latency (ms)", title=f"Latency vs input {token_unit}")
    names.append(_save(fig, ax, directory / "latency_vs_tokens.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(
        [str(int(x)) if float(x).is_integer() else f"{x:g}" for x in levels],
        [100 * s.error_rate for s in steps],
    )
    ax.set(xlabel=xlabel, ylabel="errors (%)", title="Error rate")
    names.append(_save(fig, ax, directory / "error_rate.png", grid_axis="y"))
    return names


def write_report(
    directory: Path, summary: dict[str, Any], steps: list[StepSummary], figures: list[str]
) -> Path:
    cfg, env, decision = summary["config"], summary["environment"], summary["decision"]
    knee_index = summary["knee"]
    lines = [
        f"# Load report: {summary['name']}",
        "",
        f"Run at {summary['started_at']} against {', '.join(cfg['targets'])} ({cfg['route']}), "
        f"model **{cfg.get('model', 'unknown')}**.",
        "",
        "## Configuration",
        "",
        f"- mode: **{cfg['mode']} loop**, levels {', '.join(f'{x:g}' for x in cfg['levels'])}",
        f"- per step: {cfg['warmup_s']:g} s warm-up (not counted), then {cfg['duration_s']:g} s"
        + (f" or {cfg['requests']} requests" if cfg["requests"] else ""),
        f"- inputs: {cfg['inputs']} ({cfg['payloads']} distinct texts, {cfg['token_unit']} {cfg['token_range']})",
        f"- client: {cfg['processes']} process(es), timeout {cfg['timeout_s']:g} s",
        f"- budgets: p95 <= {cfg['budgets']['latency_p95_ms']:g} ms, errors <= {cfg['budgets']['error_rate']:.1%}"
        + (
            f", cost <= ${cfg['budgets']['cost_per_million']:g}/M"
            if cfg["budgets"]["cost_per_million"]
            else ""
        ),
        f"- cost basis: {cfg['instance_count']} x {cfg['instance_type']} at ${cfg['dollars_per_hour']}/h "
        f"(prices: {summary['pricing']['source']}, {summary['pricing']['date']})",
        "",
        "## Environment",
        "",
        *[f"- {k}: {v}" for k, v in env.items()],
        "",
        "## Results",
        "",
        "Latency percentiles are over every successful request of a step (population, nearest rank); "
        + (
            "open-loop latency counts from each request's intended send time."
            if cfg["mode"] == "open"
            else "closed-loop latency counts from the send."
        ),
        "",
        steps_table(steps, knee_index, decision["best"]),
        "",
    ]
    for s in steps:
        lines += [f"- {s.mode} {s.level:g}: {note}" for note in s.notes]
        if len(s.per_server) > 1:
            spread = ", ".join(
                f"{k} {v['share']:.0%} (p50 {v['p50_ms']:.1f} ms)" for k, v in s.per_server.items()
            )
            lines.append(f"- {s.mode} {s.level:g} spread: {spread}")
    lines += [
        "",
        "## Decision",
        "",
        "- knee of the latency-throughput curve: "
        + (
            f"{steps[knee_index].mode} {steps[knee_index].level:g} ({steps[knee_index].rps:.1f} req/s, p95 {steps[knee_index].latency_ms['p95']:.1f} ms)"
            if knee_index is not None
            else "needs at least 3 steps"
        ),
        f"- best step within the budgets: **{decision['verdict']}**",
    ]
    for level, reasons in decision["reasons"].items():
        lines.append(f"  - {level}: {'; '.join(reasons)}")
    if summary.get("monitoring"):
        lines += ["", "## Monitoring", "", summary["monitoring"]]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    lines += ["", "Raw data: `requests.csv` (one row per request), `summary.json`.", ""]
    path = directory / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_all(
    directory: Path,
    summary: dict[str, Any],
    steps: list[StepSummary],
    rows: list[tuple[int, Record]],
    token_unit: str,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_requests(directory / "requests.csv", rows, steps)
    summary["steps"] = to_json(steps)
    (directory / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    figures = plot(directory, steps, rows, summary["knee"], token_unit)
    return write_report(directory, summary, steps, figures)


def compare(a: Path, b: Path, threshold: float = 0.10) -> str:
    """A regression table between two runs, step by step (matched by mode and level)."""
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    index_b = {(s["mode"], s["level"]): s for s in sb["steps"]}
    rows = [
        f"{'step':<16}{'req/s A':>9}{'req/s B':>9}{'change':>9}{'p95 A':>9}{'p95 B':>9}{'change':>9}{'err A':>8}{'err B':>8}  verdict"
    ]
    for s in sa["steps"]:
        o = index_b.get((s["mode"], s["level"]))
        if o is None:
            rows.append(f"{s['mode'] + ' ' + format(s['level'], 'g'):<16}  only in A")
            continue
        d_rps = (o["rps"] - s["rps"]) / s["rps"] if s["rps"] else math.nan
        p_a, p_b = s["latency_ms"]["p95"], o["latency_ms"]["p95"]
        d_p95 = (p_b - p_a) / p_a if p_a else math.nan
        worse = d_rps < -threshold or d_p95 > threshold or o["error_rate"] > s["error_rate"] + 0.001
        better = d_rps > threshold or d_p95 < -threshold
        verdict = "REGRESSION" if worse else "improvement" if better else "same"
        rows.append(
            f"{s['mode'] + ' ' + format(s['level'], 'g'):<16}{s['rps']:>9.1f}{o['rps']:>9.1f}{d_rps:>+9.1%}"
            f"{p_a:>9.1f}{p_b:>9.1f}{d_p95:>+9.1%}{s['error_rate']:>8.1%}{o['error_rate']:>8.1%}  {verdict}"
        )
    return "\n".join(rows)
