"""A sweep: one step per concurrency level (closed loop) or rate (open loop), in one process
or spread over several so that the client is never the bottleneck."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tqdm import tqdm

from neuronserve.loadgen.http import Payload, Record, StepPlan, Target, run_step
from neuronserve.loadgen.stats import (
    Budgets,
    StepSummary,
    cost_per_million,
    percentile,
    summarize,
    violations,
)


@dataclass(frozen=True)
class Sweep:
    mode: str
    levels: tuple[float, ...]
    duration_s: float
    warmup_s: float
    max_requests: int
    timeout_s: float
    processes: int
    budgets: Budgets
    dollars_per_hour: float | None


def _child(
    plan: StepPlan, targets: list[Target], payloads: list[Payload], headers: dict[str, str], start_wall: float
) -> tuple[list[Record], float]:
    start_perf = time.perf_counter() + (start_wall - time.time())
    before = os.times()
    records = asyncio.run(run_step(plan, targets, payloads, headers, start_at=start_perf))
    after = os.times()
    return records, (after.user - before.user) + (after.system - before.system)


def _split(level: float, parts: int, mode: str) -> list[float]:
    if mode == "open":
        return [level / parts] * parts
    whole = int(level)
    shares = [whole // parts + (1 if i < whole % parts else 0) for i in range(parts)]
    return [float(s) for s in shares if s > 0]


def run_one_step(
    sweep: Sweep,
    level: float,
    targets: Sequence[Target],
    payloads: Sequence[Payload],
    headers: dict[str, str],
    *,
    progress: bool,
    label: str,
) -> tuple[list[Record], float]:
    """Records of one step (warm-up excluded) and the client CPU seconds it used."""
    plan = StepPlan(
        mode=sweep.mode,
        level=level,
        duration_s=sweep.duration_s,
        warmup_s=sweep.warmup_s,
        max_requests=sweep.max_requests,
        timeout_s=sweep.timeout_s,
        seed=int(level * 1000),
    )
    bar = tqdm(
        total=round(sweep.warmup_s + sweep.duration_s), desc=label, unit="s", disable=not progress, leave=True
    )
    seen: list[Record] = []
    stop = threading.Event()

    def refresh() -> None:
        started = time.monotonic()
        while not stop.wait(0.5):
            bar.n = min(bar.total, round(time.monotonic() - started))
            ok = sorted(r.latency_s for r in seen[-2000:] if not r.error)
            window = max(1e-9, min(sweep.duration_s, time.monotonic() - started - sweep.warmup_s))
            bar.set_postfix_str(
                f"{sum(1 for r in seen if not r.error) / window:.1f} req/s, p50 {percentile(ok, 50) * 1000:.1f} ms, "
                f"errors {sum(1 for r in seen if r.error)}"
            )

    ticker = threading.Thread(target=refresh, daemon=True)
    ticker.start()
    try:
        if sweep.processes <= 1:
            before = os.times()
            records = asyncio.run(run_step(plan, targets, payloads, headers, on_record=seen.append))
            after = os.times()
            return records, (after.user - before.user) + (after.system - before.system)
        shares = _split(level, sweep.processes, sweep.mode)
        start_wall = time.time() + 1.0  # every process starts its clock together
        context = multiprocessing.get_context("spawn")
        with context.Pool(len(shares)) as pool:
            results = pool.starmap(
                _child,
                [
                    (
                        replace(plan, level=share, seed=plan.seed + i),
                        list(targets),
                        list(payloads),
                        headers,
                        start_wall,
                    )
                    for i, share in enumerate(shares)
                ],
            )
        records = [r for part, _cpu in results for r in part]
        seen.extend(records)
        return records, sum(cpu for _part, cpu in results)
    finally:
        stop.set()
        ticker.join()
        bar.n = bar.total
        bar.close()


def run_sweep(
    sweep: Sweep,
    targets: Sequence[Target],
    payloads: Sequence[Payload],
    headers: dict[str, str],
    *,
    progress: bool = True,
    name: str = "",
) -> tuple[list[StepSummary], list[tuple[int, Record]]]:
    """Every step until one breaks the latency or error budget (that one is kept and reported)."""
    steps: list[StepSummary] = []
    rows: list[tuple[int, Record]] = []
    unit = "concurrency" if sweep.mode == "closed" else "rate"
    for index, level in enumerate(sweep.levels):
        records, cpu_s = run_one_step(
            sweep, level, targets, payloads, headers, progress=progress, label=f"{name}{unit} {level:g}"
        )
        duration = sweep.duration_s
        if sweep.max_requests and records:
            duration = max(
                1e-9, max(r.intended_s + r.latency_s for r in records) - min(r.intended_s for r in records)
            )
        summary = summarize(records, mode=sweep.mode, level=level, duration_s=duration, client_cpu_s=cpu_s)
        if sweep.dollars_per_hour is not None:
            summary.cost_per_million = cost_per_million(summary.rps, sweep.dollars_per_hour)
        steps.append(summary)
        rows.extend((index, r) for r in records)
        broken = [
            v for v in violations(summary, replace(sweep.budgets, cost_per_million=0)) if "cost" not in v
        ]
        if broken and index < len(sweep.levels) - 1:
            summary.notes.append(f"sweep stopped here: {'; '.join(broken)}")
            break
    return steps, rows
