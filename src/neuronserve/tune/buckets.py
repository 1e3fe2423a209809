"""Shapes from traffic: the sequence buckets and batch sizes that minimise expected padded compute.

Every input pads up to the smallest compiled length that holds it, and every batch pads up to the
smallest compiled batch size that holds it. Given how often each length (or batch fill) occurs
and what one unit costs at each candidate shape, the best ``k`` boundaries are an optimal 1-D
partition, found exactly by dynamic programming in O(k * m^2) over ``m`` candidates. The largest
boundary is fixed by the caller (the longest input must still fit; nothing that was accepted
before tuning is refused after it).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence


def choose(
    counts: Mapping[int, float],
    candidates: Iterable[int],
    cost: Callable[[int], float],
    max_boundaries: int,
    largest: int,
) -> tuple[int, ...]:
    """The at most ``max_boundaries`` boundaries, ``largest`` included, that minimise
    ``sum(n * cost(smallest boundary >= value) for value, n in counts)``.

    ``counts`` maps a value (tokens of an input, or inputs in a batch) to how often it occurs;
    every value must be <= ``largest``. Ties go to fewer boundaries, then to smaller ones.
    """
    if max_boundaries < 1:
        raise ValueError("max_boundaries must be at least 1")
    if counts and max(counts) > largest:
        raise ValueError(f"a value of {max(counts)} does not fit the largest boundary {largest}")
    points = sorted({c for c in candidates if 0 < c < largest} | {largest})
    values = sorted(counts)
    # weight[i][j]: what the values in (points[i-1], points[j]] cost when they pad to points[j]
    # (i = 0 means every value up to points[j]); built from prefix sums over the sorted values.
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + counts[v])

    def mass(low: int, high: int) -> float:  # total count of values in (low, high]
        return prefix[bisect.bisect_right(values, high)] - prefix[bisect.bisect_right(values, low)]

    m = len(points)
    unit = [cost(p) for p in points]
    inf = float("inf")
    # best[k][j]: least cost of covering every value <= points[j] with k boundaries, the last at j
    best = [[inf] * m for _ in range(max_boundaries + 1)]
    back = [[-1] * m for _ in range(max_boundaries + 1)]
    for j in range(m):
        best[1][j] = mass(0, points[j]) * unit[j]
    for k in range(2, max_boundaries + 1):
        for j in range(m):
            for i in range(j):
                if best[k - 1][i] == inf:
                    continue
                total = best[k - 1][i] + mass(points[i], points[j]) * unit[j]
                if total < best[k][j] - 1e-12:
                    best[k][j], back[k][j] = total, i
    last = m - 1
    k = min(range(1, max_boundaries + 1), key=lambda k: (best[k][last], k))
    chosen = []
    j = last
    while k >= 1 and j >= 0:
        chosen.append(points[j])
        j = back[k][j]
        k -= 1
    return tuple(sorted(chosen))


def expected_cost(
    counts: Mapping[int, float], boundaries: Sequence[int], cost: Callable[[int], float]
) -> float:
    """What ``counts`` cost when each value pads to the smallest boundary that holds it."""
    ordered = sorted(boundaries)
    return sum(n * cost(ordered[bisect.bisect_left(ordered, v)]) for v, n in counts.items())


def interpolate(points: Mapping[int, float]) -> Callable[[int], float]:
    """A cost function through measured ``points`` (x -> cost): linear between them, and
    proportional to x below the first (cost scales with padded tokens or rows)."""
    xs = sorted(points)
    if not xs:
        raise ValueError("no measured points to interpolate")

    def cost(x: int) -> float:
        if x <= xs[0]:
            return points[xs[0]] * x / xs[0]
        if x >= xs[-1]:
            return points[xs[-1]] * x / xs[-1]
        i = bisect.bisect_left(xs, x)
        x0, x1 = xs[i - 1], xs[i]
        y0, y1 = points[x0], points[x1]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

    return cost


def sequence_buckets(
    lengths: Iterable[int],
    per_text_cost: Callable[[int], float],
    *,
    max_buckets: int,
    largest: int,
    step: int = 8,
    smallest: int = 8,
) -> tuple[int, ...]:
    """Sequence lengths to compile for inputs of ``lengths`` tokens: multiples of ``step`` (and
    ``largest``), at most ``max_buckets`` of them, minimising expected padded compute."""
    counts = Counter(max(1, n) for n in lengths)
    candidates = range(max(step, smallest), largest + 1, step)
    return choose(counts, candidates, per_text_cost, max_buckets, largest)


def batch_sizes(per_call_cost: Callable[[int], float], *, max_sizes: int, largest: int) -> tuple[int, ...]:
    """Batch sizes to compile up to ``largest``, at most ``max_sizes`` of them, minimising the
    expected cost of a batch whose fill is unknown in advance: every doubling of the fill equally
    likely (a weight of 1/fill), since load moves fills across scales, light load keeps them
    small and saturation fills the largest. 1 always stays, for a lone request."""
    counts = {fill: 1.0 / fill for fill in range(1, largest + 1)}
    if max_sizes < 2:
        return (largest,)
    rest = choose(
        {v: n for v, n in counts.items() if v > 1},
        range(2, largest + 1),
        per_call_cost,
        max_sizes - 1,
        largest,
    )
    return (1, *rest) if largest > 1 else (1,)
