"""What a tune found, and how it is written: ``summary.json``, ``report.md`` and ``pareto.png``.

:class:`Outcome` is filled as the search goes (see ``tune.run``), so an interrupted run still
reports what ran.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neuronserve.tune.search import FIRST_DURATION_S, LONGEST_DURATION_S, Candidate, SearchResult, Trial


def csv(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


@dataclass
class Grid:
    batch_sizes: tuple[int, ...]
    sequence_lengths: tuple[int, ...]
    expected_cost: float  # seconds of compute per text of the sample, at full batches


@dataclass
class Outcome:
    """Everything the report says; filled as the run goes, so an interrupt still has a report."""

    directory: Path
    started_at: str
    time_budget_s: float
    budgets: dict[str, float]
    instance_type: str
    dataset: str
    model: str = ""
    backend: str = ""
    lengths: list[int] = field(default_factory=list)
    excluded: int = 0  # texts longer than the model can take, left out of the load
    configured: Grid | None = None
    tuned: Grid | None = None
    candidates: int = 0
    search: SearchResult | None = None
    interrupted: bool = False
    error: str = ""
    elapsed_s: float = 0.0
    tuned_properties: Path | None = None


def write_report(outcome: Outcome) -> Path:
    """summary.json, report.md and (when a trial ran) pareto.png in ``outcome.directory``; the
    plot is guarded: whatever fails there, summary.json and report.md are written."""
    out = outcome.directory
    search = outcome.search
    best = search.best if search else None
    trials = search.trials if search else []
    plot = None
    if any(not t.failure for t in trials):
        try:
            plot = pareto_plot(out / "pareto.png", trials, best)
        except Exception as exc:
            outcome.error = (outcome.error + "; " if outcome.error else "") + f"pareto.png: {exc}"
    summary = {
        "started_at": outcome.started_at,
        "elapsed_s": round(outcome.elapsed_s, 1),
        "time_budget_s": outcome.time_budget_s,
        "interrupted": outcome.interrupted,
        "out_of_time": bool(search and search.out_of_time),
        "model": outcome.model,
        "backend": outcome.backend,
        "dataset": outcome.dataset,
        "budgets": outcome.budgets,
        "instance_type": outcome.instance_type,
        "configured_grid": asdict(outcome.configured) if outcome.configured else None,
        "tuned_grid": asdict(outcome.tuned) if outcome.tuned else None,
        "candidates": outcome.candidates,
        "rungs": search.rungs if search else 0,
        "trials": [_trial_dict(t) for t in trials],
        "winner": _trial_dict(best) if best else None,
        "tuned_properties": str(outcome.tuned_properties) if outcome.tuned_properties else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    report = out / "report.md"
    report.write_text(_markdown(outcome, best, trials, plot), encoding="utf-8")
    return report


def _trial_dict(trial: Trial) -> dict[str, Any]:
    data = asdict(trial)
    data["candidate"] = asdict(trial.candidate)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data.items()}


def _markdown(outcome: Outcome, best: Trial | None, trials: Sequence[Trial], plot: Path | None) -> str:
    lines = [
        *_summary(outcome, trials),
        *_shapes(outcome),
        *_winner(outcome, best, trials),
        *(["## Throughput vs p95", "", f"![pareto]({plot.name})", ""] if plot is not None else []),
        *_every_trial(trials),
    ]
    if outcome.error:
        lines += ["", f"Error: {outcome.error}"]
    return "\n".join(lines) + "\n"


def _summary(outcome: Outcome, trials: Sequence[Trial]) -> list[str]:
    search = outcome.search
    state = (
        "interrupted (Ctrl-C): this report covers what ran before"
        if outcome.interrupted
        else "stopped by the time budget before every planned trial ran"
        if search and search.out_of_time
        else "complete"
    )
    lengths = outcome.lengths
    return [
        f"# neuronserve tune {outcome.started_at}",
        "",
        f"- Search: {state}; {outcome.elapsed_s:.0f} s of the {outcome.time_budget_s:.0f} s budget.",
        f"- Model: {outcome.model or '?'} on {outcome.backend or '?'}; traffic: {outcome.dataset}"
        + (
            f" ({len(lengths)} texts, tokens p50 {lengths[len(lengths) // 2]}, max {lengths[-1]})"
            if lengths
            else ""
        ),
        f"- Budgets: p95 <= {outcome.budgets['latency_p95_ms']:g} ms, errors <= "
        f"{outcome.budgets['error_rate']:.2%}"
        + (
            f", cost <= ${outcome.budgets['cost_per_million']:g} per million"
            if outcome.budgets["cost_per_million"]
            else ""
        )
        + f"; cost priced as {outcome.instance_type}."
        + (
            f" {outcome.excluded} text(s) longer than the model allows were left out."
            if outcome.excluded
            else ""
        ),
        f"- Candidates: {outcome.candidates}; trials run: {len(trials)} in {search.rungs if search else 0} "
        f"rung(s) of successive halving (each rung keeps the best third and runs it 3x longer); "
        f"load time per step {FIRST_DURATION_S:g} s in the first rung, up to {LONGEST_DURATION_S:g} s; "
        f"{sum(t.wall_s for t in trials):.0f} s spent in trials.",
        "",
    ]


def _shapes(outcome: Outcome) -> list[str]:
    if not (outcome.configured and outcome.tuned):
        return []
    ratio = (
        outcome.tuned.expected_cost / outcome.configured.expected_cost
        if outcome.configured.expected_cost
        else 1
    )
    return [
        "## Shapes from traffic",
        "",
        "| grid | sequence lengths | batch sizes | expected compute per text |",
        "|---|---|---|---|",
        f"| configured | {csv(outcome.configured.sequence_lengths)} | {csv(outcome.configured.batch_sizes)} "
        f"| {outcome.configured.expected_cost * 1000:.2f} ms |",
        f"| tuned | {csv(outcome.tuned.sequence_lengths)} | {csv(outcome.tuned.batch_sizes)} "
        f"| {outcome.tuned.expected_cost * 1000:.2f} ms ({ratio:.2f}x) |",
        "",
        "Expected compute: each text of the sample padded to its bucket, at the trace's measured "
        "per-text cost of the largest batch (one intra-op thread).",
        "",
    ]


def _winner(outcome: Outcome, best: Trial | None, trials: Sequence[Trial]) -> list[str]:
    lines = ["## Winner", ""]
    if best is not None and best.rps > 0:
        c = best.candidate
        lines += [
            f"**{c.label}**: {best.rps:.1f} req/s within every budget (concurrency {best.level:g}: "
            f"p50 {best.p50_ms:.0f} ms, p95 {best.p95_ms:.0f} ms, p99 {best.p99_ms:.0f} ms"
            + (f", ${best.cost_per_million:.2f} per million requests" if best.cost_per_million else "")
            + ").",
            "",
            f"Why: the highest throughput within the budgets among the {sum(1 for t in trials if t.rung == best.rung)} "
            f"candidate(s) of the last rung (rung {best.rung + 1}, {best.duration_s:g} s per load step), "
            "which the shorter rungs had ranked best.",
            "",
        ]
        if outcome.tuned_properties:
            lines += [
                f"Config: `{outcome.tuned_properties}` (complete; use it as it is):",
                "",
                "```bash",
                f"./trace-model/run.sh --config {outcome.tuned_properties}",
                f"./fast-api/deploy.sh --config {outcome.tuned_properties}",
                "```",
                "",
            ]
    else:
        lines += [
            "No candidate met the budgets" + (" before the interrupt" if outcome.interrupted else "") + ".",
            "",
        ]
    return lines


def _every_trial(trials: Sequence[Trial]) -> list[str]:
    lines = [
        "## Every trial",
        "",
        "| rung | cores/server | copies | max batch | delay ms | s/step | req/s in budget | at conc. "
        "| p50 ms | p95 ms | p99 ms | errors | $/M | memory GiB | wall s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        c = t.candidate
        lines.append(
            f"| {t.rung + 1} | {c.cores_per_server} | {c.copies} | {c.max_batch} | {c.delay_ms:g} | {t.duration_s:g} "
            f"| {t.rps:.1f} | {'' if t.level is None else f'{t.level:g}'} | {_ms(t.p50_ms)} | {_ms(t.p95_ms)} "
            f"| {_ms(t.p99_ms)} | {t.error_rate:.2%} | {'' if t.cost_per_million is None else f'{t.cost_per_million:.2f}'} "
            f"| {'' if t.memory_bytes is None else f'{t.memory_bytes / (1 << 30):.2f}'} | {t.wall_s:.0f} "
            f"| {t.failure.replace('|', '/')} |"
        )
    return lines


def _ms(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.0f}"


def pareto_plot(path: Path, trials: Sequence[Trial], best: Trial | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest: dict[Candidate, Trial] = {}
    for t in trials:
        if not t.failure and not math.isnan(t.p95_ms):
            latest[t.candidate] = t
    points = sorted(latest.values(), key=lambda t: t.p95_ms)
    frontier, top = [], -1.0
    for t in points:
        if t.rps > top:
            frontier.append(t)
            top = t.rps
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([t.p95_ms for t in points], [t.rps for t in points], s=18, color="#888", label="candidates")
    ax.plot([t.p95_ms for t in frontier], [t.rps for t in frontier], color="#1f77b4", label="Pareto front")
    if best is not None and not math.isnan(best.p95_ms):
        ax.scatter([best.p95_ms], [best.rps], s=160, marker="*", color="#d62728", label="winner", zorder=3)
    ax.set_xlabel("p95 latency at the reported load (ms)")
    ax.set_ylabel("throughput within budget (req/s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
