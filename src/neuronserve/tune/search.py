"""Deployment search by successive halving: every candidate gets a short run, the better part a
longer one, and so on, until one is left or the time is spent.

Pure logic: the caller passes ``evaluate(candidate, duration_s) -> Trial`` (deploy, load, tear
down) and a clock, so the pruning is tested on synthetic cost surfaces without a server.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Seconds of load per step in successive halving's first rung (x3 per rung), and the most.
FIRST_DURATION_S = 2.0
LONGEST_DURATION_S = 8.0


@dataclass(frozen=True)
class Candidate:
    """One deployment: how the cores are split and how each server batches."""

    cores_per_server: int
    copies: int
    max_batch: int
    delay_ms: float

    @property
    def label(self) -> str:
        return f"{self.cores_per_server} core(s)/server, {self.copies} cop(ies), batch<={self.max_batch}, delay {self.delay_ms:g} ms"

    def overrides(self) -> dict[str, str]:
        """The settings this candidate changes (``deploy.servers=max``: every core is used)."""
        return {
            "deploy.cores_per_server": str(self.cores_per_server),
            "deploy.servers": "max",
            "serve.models_per_server": str(self.copies),
            "serve.max_batch_size": str(self.max_batch),
            "serve.max_batch_delay_ms": f"{self.delay_ms:g}",
        }


@dataclass
class Trial:
    """One measured run of one candidate. ``rps`` is the best throughput whose step met every
    budget (0 when none did); the latency figures are that step's (or the first step's)."""

    candidate: Candidate
    rung: int
    duration_s: float
    rps: float
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    p99_ms: float = math.nan
    error_rate: float = 0.0
    cost_per_million: float | None = None
    level: float | None = None  # the load (concurrency or rate) of the step reported
    memory_bytes: int | None = None
    wall_s: float = 0.0  # deploy + load + teardown
    failure: str = ""  # why the candidate could not run (deploy failed, memory plan refused)
    steps: list[dict[str, float | None]] = field(default_factory=list)

    @property
    def score(self) -> tuple[float, float]:
        """Higher is better: throughput within budget, then (for ties, e.g. all at 0) lower p95."""
        p95 = self.p95_ms if not math.isnan(self.p95_ms) else math.inf
        return (self.rps, -p95)


@dataclass
class SearchResult:
    trials: list[Trial]
    rungs: int
    interrupted: bool = False
    out_of_time: bool = False

    @property
    def best(self) -> Trial | None:
        """The winner: the best trial of the highest rung that ran (longer runs are the surer)."""
        ran = [t for t in self.trials if not t.failure]
        if not ran:
            return None
        # The highest rung where something met the budgets (noise may sink a whole later rung).
        pool = [t for t in ran if t.rps > 0] or ran
        top = max(t.rung for t in pool)
        return max((t for t in pool if t.rung == top), key=lambda t: t.score)


def successive_halving(
    candidates: Sequence[Candidate],
    evaluate: Callable[[Candidate, int, float], Trial],
    *,
    time_budget_s: float,
    first_duration_s: float,
    longest_duration_s: float,
    eta: int = 3,
    clock: Callable[[], float] = time.monotonic,
    on_trial: Callable[[Trial, SearchResult], None] | None = None,
) -> SearchResult:
    """Run the search; returns every trial. ``evaluate(candidate, rung, duration_s)``.

    Before each trial the time it will take is estimated from the trials so far (wall time per
    second of load, plus a fixed part); a trial that would not finish within ``time_budget_s``
    is not started, and the search ends with what it has (``out_of_time``). A
    KeyboardInterrupt ends it the same way (``interrupted``), after the trial in progress has
    cleaned up.
    """
    if not candidates:
        raise ValueError("no candidate deployments to search")
    started = clock()
    result = SearchResult(trials=[], rungs=0)
    alive = list(candidates)
    rung = 0
    duration = first_duration_s
    try:
        while alive:
            result.rungs = rung + 1
            this_rung: list[Trial] = []
            for candidate in alive:
                if clock() - started + _estimate(result.trials, duration) > time_budget_s:
                    result.out_of_time = True
                    break
                trial = evaluate(candidate, rung, duration)
                this_rung.append(trial)
                result.trials.append(trial)
                if on_trial is not None:
                    on_trial(trial, result)
            if result.out_of_time or len(alive) == 1:
                break
            ranked = sorted((t for t in this_rung if not t.failure), key=lambda t: t.score, reverse=True)
            keep = max(1, math.ceil(len(alive) / eta))
            alive = [t.candidate for t in ranked[:keep]]
            if len(alive) == 1:
                break  # the winner already beat the others at this rung's length: nothing to compare
            rung += 1
            duration = min(longest_duration_s, duration * eta)
    except KeyboardInterrupt:
        result.interrupted = True
    return result


def _estimate(trials: Sequence[Trial], duration_s: float) -> float:
    """Expected wall time of one more trial of ``duration_s`` seconds of load per step."""
    timed = [t for t in trials if t.wall_s > 0 and not t.failure]
    if not timed:
        return 0.0  # nothing measured yet: the first trial always runs
    # wall = fixed + per * duration, fitted crudely: fixed from the shortest trials' overhead.
    per = max((t.wall_s / max(t.duration_s, 1e-9) for t in timed), default=0.0)
    longest = max(t.duration_s for t in timed)
    if duration_s <= longest:
        return max(t.wall_s for t in timed if t.duration_s <= duration_s + 1e-9)
    return per * duration_s
