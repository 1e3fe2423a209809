"""neuronserve tune's pure parts: the shape chooser against brute force and known answers, and
successive halving on synthetic cost surfaces (a fake clock; no server)."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from neuronserve.tune import buckets
from neuronserve.tune.search import Candidate, SearchResult, Trial, successive_halving


def linear(x: int) -> float:
    return float(x)


def brute_force(counts: dict[int, float], candidates: list[int], k: int, largest: int) -> float:
    inner = [c for c in candidates if c < largest]
    best = math.inf
    for n in range(k):
        for chosen in itertools.combinations(inner, n):
            best = min(best, buckets.expected_cost(counts, (*chosen, largest), linear))
    return best


def test_two_clusters_get_a_bucket_at_the_top_of_each() -> None:
    lengths = [12] * 50 + [15] * 50 + [97] * 40 + [100] * 60
    chosen = buckets.sequence_buckets(lengths, linear, max_buckets=3, largest=128)
    # 16 holds the short cluster, 104 the long one (multiples of 8), 128 stays for anything longer
    assert chosen == (16, 104, 128)


def test_the_largest_bucket_always_stays_even_when_no_input_needs_it() -> None:
    chosen = buckets.sequence_buckets([10] * 100, linear, max_buckets=2, largest=128)
    assert chosen == (16, 128)


def test_one_bucket_is_the_largest() -> None:
    assert buckets.sequence_buckets([10, 50, 90], linear, max_buckets=1, largest=128) == (128,)


@pytest.mark.parametrize("seed", range(20))
def test_the_chooser_matches_brute_force_on_random_distributions(seed: int) -> None:
    rng = random.Random(seed)
    largest = rng.choice([64, 96, 128])
    counts = Counter(rng.randint(1, largest) for _ in range(rng.randint(5, 300)))
    k = rng.randint(1, 4)
    chosen = buckets.choose(counts, range(8, largest + 1, 8), linear, k, largest)
    assert len(chosen) <= k and chosen[-1] == largest
    cost = buckets.expected_cost(counts, chosen, linear)
    assert cost == pytest.approx(brute_force(dict(counts), list(range(8, largest + 1, 8)), k, largest))


def test_a_superlinear_cost_moves_boundaries_towards_the_long_inputs() -> None:
    lengths = list(range(1, 129))  # uniform
    flat = buckets.sequence_buckets(lengths, linear, max_buckets=2, largest=128)
    steep = buckets.sequence_buckets(lengths, lambda s: float(s**3), max_buckets=2, largest=128)
    assert flat == (64, 128)
    assert steep[0] > flat[0]  # padding a long input costs more, so the split moves up


def test_batch_sizes_keep_one_and_the_largest_and_space_the_rest_by_scale() -> None:
    sizes = buckets.batch_sizes(linear, max_sizes=4, largest=32)
    assert sizes[0] == 1 and sizes[-1] == 32 and len(sizes) == 4
    # every doubling of the fill equally likely (weight 1/fill): small sizes are kept finer
    weights = {v: 1.0 / v for v in range(2, 33)}
    assert buckets.expected_cost(weights, sizes[1:], linear) == pytest.approx(
        brute_force(weights, list(range(2, 33)), 3, 32)
    )
    assert sizes == (1, 6, 16, 32)


def test_interpolation_is_linear_between_points_and_proportional_outside() -> None:
    cost = buckets.interpolate({16: 4.0, 32: 8.0, 128: 40.0})
    assert cost(8) == pytest.approx(2.0)
    assert cost(24) == pytest.approx(6.0)
    assert cost(80) == pytest.approx(24.0)
    assert cost(256) == pytest.approx(80.0)


def test_a_value_above_the_largest_boundary_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        buckets.choose({200: 1}, [64, 128], linear, 2, 128)


# --- successive halving ---------------------------------------------------------------------


class FakeWorld:
    """A synthetic cost surface: each candidate has a true throughput; a trial measures it with
    noise that shrinks with the load duration, and costs 10 s of setup plus its duration x 6
    steps of (fake) wall time."""

    def __init__(self, truth: dict[Candidate, float], noise: float, seed: int = 0) -> None:
        self.truth = truth
        self.noise = noise
        self.now = 0.0
        self.calls: list[tuple[Candidate, int, float]] = []
        self.rng = random.Random(seed)

    def clock(self) -> float:
        return self.now

    def evaluate(self, candidate: Candidate, rung: int, duration: float) -> Trial:
        self.calls.append((candidate, rung, duration))
        wall = 10.0 + 6 * duration
        self.now += wall
        measured = self.truth[candidate] * (1 + self.rng.gauss(0, self.noise / math.sqrt(duration)))
        return Trial(candidate, rung, duration, rps=max(0.0, measured), p95_ms=100.0, wall_s=wall)


def space() -> list[Candidate]:
    return [
        Candidate(cps, c, mb, d) for cps in (1, 2) for c in (1, 2) for mb in (4, 8, 32) for d in (2.0, 10.0)
    ]


def surface(best: Candidate) -> dict[Candidate, float]:
    rng = random.Random(1)
    truth = {c: rng.uniform(50, 90) for c in space()}
    truth[best] = 100.0
    return truth


def halve(world: FakeWorld, evaluate: Any = None, budget: float = 10_000) -> SearchResult:
    """The search over space() on ``world``'s clock: 1.5 s first rung, 8 s cap."""
    return successive_halving(
        space(),
        evaluate or world.evaluate,
        time_budget_s=budget,
        first_duration_s=1.5,
        longest_duration_s=8,
        clock=world.clock,
    )


def test_halving_finds_the_best_with_far_fewer_trials_than_brute_force() -> None:
    best = Candidate(1, 1, 8, 2.0)
    world = FakeWorld(surface(best), noise=0.05)
    result = halve(world)
    assert result.best is not None and result.best.candidate == best
    per_rung = Counter(rung for _c, rung, _d in world.calls)
    assert per_rung[0] == 24 and per_rung[1] == 8 and per_rung[2] == 3 and per_rung[3] == 0
    # durations grow 3x per rung up to the cap
    assert sorted({d for _c, _r, d in world.calls}) == [1.5, 4.5, 8.0]
    # brute force at the longest duration: 24 trials x (10 + 48) s; halving spends much less, and
    # runs only the 3 most promising at that length
    assert world.now < 0.75 * 24 * (10 + 6 * 8)
    assert sum(1 for _c, _r, d in world.calls if d == 8.0) == 3


def test_a_candidate_pruned_early_never_runs_again() -> None:
    world = FakeWorld(surface(Candidate(2, 2, 32, 10.0)), noise=0.0)
    result = halve(world)
    first = sorted((t for t in result.trials if t.rung == 0), key=lambda t: t.rps, reverse=True)
    survivors = {t.candidate for t in first[:8]}
    later = {t.candidate for t in result.trials if t.rung > 0}
    assert later <= survivors  # only the best third of rung 1 ran again


def test_the_time_budget_stops_before_a_trial_that_would_not_fit() -> None:
    world = FakeWorld(surface(Candidate(1, 1, 4, 2.0)), noise=0.0)
    budget = 400.0
    result = halve(world, budget=budget)
    assert result.out_of_time
    assert world.now <= budget  # no trial was started that would end past the budget
    assert result.best is not None  # the best of what ran


def test_failed_candidates_are_never_promoted() -> None:
    truth = surface(Candidate(1, 1, 4, 2.0))
    world = FakeWorld(truth, noise=0.0)
    broken = Candidate(2, 2, 32, 2.0)

    def evaluate(candidate: Candidate, rung: int, duration: float) -> Trial:
        trial = world.evaluate(candidate, rung, duration)
        if candidate == broken:
            trial.rps = 1e9  # a failure's figure must not count
            trial.failure = "memory plan refused: too big"
        return trial

    result = halve(world, evaluate)
    assert all(t.candidate != broken for t in result.trials if t.rung > 0)
    assert result.best is not None and result.best.candidate != broken


def test_an_interrupt_keeps_the_trials_so_far() -> None:
    world = FakeWorld(surface(Candidate(1, 1, 4, 2.0)), noise=0.0)

    def evaluate(candidate: Candidate, rung: int, duration: float) -> Trial:
        if len(world.calls) == 5:
            raise KeyboardInterrupt
        return world.evaluate(candidate, rung, duration)

    result = halve(world, evaluate)
    assert result.interrupted and len(result.trials) == 5


def test_a_last_rung_sunk_by_noise_does_not_lose_the_winner() -> None:
    a, b = Candidate(1, 1, 8, 2.0), Candidate(2, 1, 8, 2.0)
    trials = [Trial(a, 0, 2, rps=90.0), Trial(b, 0, 2, rps=80.0), Trial(a, 1, 6, rps=0.0, p95_ms=400.0)]
    best = SearchResult(trials=trials, rungs=2).best
    assert best is not None and best.candidate == a and best.rps == 90.0


def test_tune_refuses_a_config_of_several_models(tmp_path: Path) -> None:
    from neuronserve.config import ConfigError
    from neuronserve.tune.run import TuneOptions, tune

    config = tmp_path / "c.properties"
    config.write_text("models.reranker.source=/models/ce\nmodels.reranker.task=text-classification\n")
    options = TuneOptions(config=str(config), overrides=(), dataset="", time_budget_s=60)
    with pytest.raises(ConfigError, match="tune measures one model: this config also serves reranker"):
        tune(options, emit=lambda _line: None)
