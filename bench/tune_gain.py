"""What `neuronserve tune` gains: the tuned config against the defaults, on the same traffic.

    python bench/tune_gain.py [--time-budget 900] [--budget-ms 300] [--rounds 2] [--work DIR]

1. Traffic: a mixed-length sample made here, half short texts (13-16 tokens) and half ~100-token
   texts (92-100), from the bundled all-MiniLM-L6-v2's tokenizer.
2. `neuronserve tune --time-budget T` on it, timed (the acceptance: within 15 minutes at 900 s).
3. Then, in the same run, the default config and the tuned config are each traced (cached),
   deployed and loaded by `run_apis.py` on the same traffic (closed loop, concurrency
   1..64 in steps of about 1.5x, stopping at the first level whose p95 breaks the budget); the figure is run_apis.py's
   decision: the highest throughput whose step stays within the p95 and error budgets.
   Default and tuned alternate for --rounds rounds; the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import trace_cpu  # noqa: E402
from neuronserve.deploy.local import free_ports  # noqa: E402

WORDS = [
    "retrieval",
    "augmented",
    "generation",
    "ranks",
    "passages",
    "for",
    "every",
    "query",
    "before",
    "the",
    "reader",
    "answers",
    "embeddings",
    "of",
    "documents",
    "live",
    "in",
    "a",
    "vector",
    "index",
    "that",
    "serves",
    "nearest",
    "neighbours",
    "to",
    "clients",
    "inferentia",
    "cores",
    "run",
    "the",
    "encoder",
    "while",
    "the",
    "host",
    "tokenizes",
    "batches",
    "and",
    "answers",
    "requests",
]
LEVELS = "1,2,4,8,12,16,24,32,48,64"


def sample(counter: object, low: int, high: int, count: int, rng: random.Random) -> list[str]:
    """``count`` texts of ``low``..``high`` tokens (words drawn from WORDS)."""
    out: list[str] = []
    while len(out) < count:
        words: list[str] = []
        while True:
            words.append(rng.choice(WORDS))
            n = counter.count(" ".join(words))  # type: ignore[attr-defined]
            if n >= low:
                break
        if n <= high:
            out.append(" ".join(words))
    return out


def traffic(work: Path, artifacts: Path) -> Path:
    from neuronserve.loadgen.payloads import TokenCounter

    counter = TokenCounter(artifacts)
    rng = random.Random(7)
    texts = sample(counter, 13, 16, 100, rng) + sample(counter, 92, 100, 100, rng)
    rng.shuffle(texts)
    path = work / "traffic.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def measure(work: Path, config: Path, dataset: Path, label: str, duration: float) -> dict[str, float]:
    """Deploy ``config`` on free ports, sweep it with run_apis.py, clean up; the decision's step."""
    port, base = free_ports(1), free_ports(8)
    sets = [
        f"deploy.name=gain-{label}",
        f"deploy.port={port}",
        f"deploy.base_port={base}",
        "monitor.enabled=false",
    ]
    args = [a for kv in sets for a in ("--set", kv)]
    neuronserve_with(config, "trace", "--quiet", *args)
    neuronserve_with(config, "deploy", *args)
    try:
        out = work / "results"
        result = subprocess.run(
            [sys.executable, str(REPO / "run_apis.py"), "--config", str(config), *args, "--dataset", str(dataset),
             "--concurrency", LEVELS, "--duration", f"{duration:g}", "--warmup", "2", "--output", str(out),
             "--name", f"gain-{label}", "--no-progress"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise SystemExit(f"run_apis.py failed for {label}:\n{result.stderr[-2000:]}")
        summary = json.loads(sorted(out.glob(f"gain-{label}-*/summary.json"))[-1].read_text())
    finally:
        neuronserve_with(config, "cleanup", *args, check=False)
    best = summary["decision"]["best"]
    if best is None:
        return {"rps": 0.0, "level": 0.0, "p95_ms": float("nan")}
    step = summary["steps"][best]
    return {"rps": step["rps"], "level": step["level"], "p95_ms": step["latency_ms"]["p95"]}


def neuronserve_with(config: Path, *args: str, check: bool = True) -> str:
    """`neuronserve` with an explicit --config (bench.common's helper reads work/config.properties)."""
    cmd = [sys.executable, "-m", "neuronserve.cli", *args, "--config", str(config)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_env())
    if check and result.returncode != 0:
        raise SystemExit(f"neuronserve {args[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--time-budget", type=float, default=900.0)
    parser.add_argument("--budget-ms", type=float, default=300.0, help="p95 budget (bench.latency_budget_ms)")
    parser.add_argument("--rounds", type=int, default=2, help="default/tuned measurement pairs")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load step")
    parser.add_argument("--work", type=Path, help="scratch directory (kept; default: a temporary one)")
    args = parser.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="tune-gain-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.properties"
    config.write_text(
        "\n".join([
            f"trace.output_dir={work / 'trace'}",
            f"bench.output_dir={work / 'results'}",
            f"deploy.run_dir={work / 'run'}",
            f"bench.latency_budget_ms={args.budget_ms:g}",
            "monitor.enabled=false",
        ]) + "\n"
    )  # fmt: skip
    trace_cpu(work, work / "trace")
    dataset = traffic(work, work / "trace" / "all-MiniLM-L6-v2" / "cpu")
    print(f"traffic: {dataset} (100 texts of 13-16 tokens, 100 of 92-100); p95 budget {args.budget_ms:g} ms")
    started = time.monotonic()
    tune = subprocess.run(
        [sys.executable, "-m", "neuronserve.cli", "tune", "--config", str(config), "--dataset", str(dataset),
         "--time-budget", f"{args.time_budget:g}"],
        capture_output=True, text=True, check=False, env=_env(),
    )  # fmt: skip
    tune_s = time.monotonic() - started
    print(tune.stdout[-4000:])
    if tune.returncode != 0:
        raise SystemExit(f"neuronserve tune failed ({tune.returncode}):\n{tune.stderr[-3000:]}")
    tuned = sorted((work / "results").glob("tune-*/tuned.properties"))[-1]
    print(f"tune took {tune_s:.0f} s (budget {args.time_budget:.0f} s); tuned config: {tuned}")
    figures: dict[str, list[dict[str, float]]] = {"default": [], "tuned": []}
    for i in range(args.rounds):
        for label, path in (("default", config), ("tuned", tuned)):
            figures[label].append(measure(work, path, dataset, label, args.duration))
            f = figures[label][-1]
            print(
                f"round {i + 1} {label:<8}: {f['rps']:.1f} req/s within budget "
                f"(concurrency {f['level']:g}, p95 {f['p95_ms']:.0f} ms)",
                flush=True,
            )
    default = statistics.median(f["rps"] for f in figures["default"])
    best = statistics.median(f["rps"] for f in figures["tuned"])
    ratio = best / default if default else float("inf")
    print(
        f"\nwithin p95 <= {args.budget_ms:g} ms (run_apis.py, same traffic, medians of {args.rounds}): "
        f"default {default:.1f} req/s, tuned {best:.1f} req/s, ratio {ratio:.2f}x; tune took {tune_s:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
