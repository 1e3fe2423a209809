"""One cpu artifact for every shape vs one artifact per shape: time per call, measured in one run.

    python bench/shared_artifact.py [--runs 5]

The cpu backend traces the bundled all-MiniLM-L6-v2 once, at the largest shape, and serves every
other shape from that artifact (verified at each). This compares, at several shapes, one call of
that shared artifact with one call of an artifact traced and frozen at that very shape, in
alternating windows on one thread (a copy's arrangement), and prints the median ratio per shape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = ((1, 16), (8, 32), (4, 64), (8, 128), (32, 64))
LARGEST = (32, 128)


def compile_at(backend: Any, eager: Any, shape: tuple[int, int], dest: Path) -> Any:
    from neuronserve.models import sample_inputs
    from neuronserve.tasks import TaskKind
    from neuronserve.trace import _quiet_tracing

    with _quiet_tracing():
        return backend.compile(eager.module, sample_inputs(eager, TaskKind.FEATURE_EXTRACTION, *shape), dest)


def seconds_per_call(model: Any, inputs: tuple[Any, ...], budget_s: float = 0.4) -> float:
    calls = 0
    started = time.perf_counter()
    while time.perf_counter() - started < budget_s or calls < 2:
        model.run(inputs)
        calls += 1
    return (time.perf_counter() - started) / calls


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    import torch

    from neuronserve.backends.cpu import CpuBackend
    from neuronserve.models import load_eager, resolve_source, sample_inputs
    from neuronserve.tasks import TaskKind

    torch.set_num_threads(1)
    eager = load_eager(resolve_source("bundled:all-MiniLM-L6-v2"), TaskKind.FEATURE_EXTRACTION)
    work = Path(tempfile.mkdtemp(prefix="neuronserve-shared-"))
    backend = CpuBackend()
    shared = compile_at(backend, eager, LARGEST, work / "shared.pt")
    print(f"{'shape':<10}{'own ms':>9}{'shared ms':>11}{'shared/own':>12}   (median of {args.runs})")
    for b, s in SHAPES:
        own = compile_at(backend, eager, (b, s), work / f"own-b{b}-s{s}.pt")
        inputs = sample_inputs(eager, TaskKind.FEATURE_EXTRACTION, b, s)
        for model in (own, shared):  # past TorchScript's profiling runs
            model.run(inputs)
            model.run(inputs)
        own_s, shared_s = [], []
        for _ in range(args.runs):
            own_s.append(seconds_per_call(own, inputs))
            shared_s.append(seconds_per_call(shared, inputs))
        ratio = statistics.median(x / y for x, y in zip(shared_s, own_s, strict=True))
        print(
            f"b{b} s{s:<6}{statistics.median(own_s) * 1000:>9.2f}{statistics.median(shared_s) * 1000:>11.2f}"
            f"{ratio:>12.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
