"""Served vs raw throughput, and dynamic batching vs none, measured in one run on this machine.

    python bench/serve_overhead.py [--runs 5] [--duration 8] [--copies 2] [--auto-cast none,bf16]

For each precision (trace.cpu_auto_cast none = fp32, bf16 = bf16 matmuls like neuronx-cc's
default auto-cast), on the same cores and compiled shapes:
  sweep     raw in-process model throughput (no HTTP) of every compiled batch size, as 2 copies x
            1 thread (the server's arrangement) and 1 copy x all threads; the fastest is "raw";
then per run, in adjacent windows so that each ratio compares moments close in time (this host
is shared and its speed drifts by tens of percent within minutes):
  raw       that best configuration again;
  served    throughput through the real server (gunicorn, one uvicorn worker) at saturation:
            closed loop, concurrency 16, one text per request;
  unbatched the same server with serve.max_batch_size=1, on short texts;
  latency   served p50 at concurrency 1 against one raw batch-1 call (1 thread per copy).
It prints every run and the medians: served/raw for ~120-token texts, and batched/unbatched
throughput for ~15-token texts.

    python bench/serve_overhead.py --deployment [--runs 5] [--duration 8]

measures instead the figure compared with other serving stacks: requests/s of the default
deployment (`neuronserve deploy` at every default: one server per core behind nginx) on
~15-token texts, saturated by hey at concurrency 64.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.servers import free_port, wait_ready  # noqa: E402

from neuronserve.acceptance import WORDS as ACCEPTANCE_WORDS  # noqa: E402
from neuronserve.loadgen.http import Payload, StepPlan, Target, run_step  # noqa: E402
from neuronserve.loadgen.payloads import TokenCounter  # noqa: E402
from neuronserve.loadgen.stats import percentile  # noqa: E402

BATCH_SIZES = "1,2,4,8,16,32"
SEQUENCE_LENGTHS = "16,128"
WORDS = [
    *ACCEPTANCE_WORDS,  # the hardware acceptance run's texts are made of these too
    "while",
    "monitoring",
    "reports",
    "latency",
    "percentiles",
    "and",
    "queue",
    "depth",
    "for",
    "each",
    "server",
    "behind",
    "the",
    "balancer",
]


def texts_of_length(counter: TokenCounter, low: int, high: int, count: int) -> list[str]:
    """``count`` distinct texts whose token count (with special tokens) is in [low, high]."""
    out: list[str] = []
    start = 0
    while len(out) < count:
        words: list[str] = []
        i = start
        while True:
            words.append(WORDS[i % len(WORDS)])
            i += 1
            n = counter.count(" ".join(words))
            if n >= low:
                break
        if n <= high:
            out.append(" ".join(words))
        start += 3
    return out


def trace_artifacts(out: Path, auto_cast: str) -> Path:
    from neuronserve.config import build_settings
    from neuronserve.trace import run_trace

    settings = build_settings(
        {
            "trace.backend": ("cpu", "bench"),
            "trace.batch_sizes": (BATCH_SIZES, "bench"),
            "trace.sequence_lengths": (SEQUENCE_LENGTHS, "bench"),
            "trace.output_dir": (str(out / auto_cast), "bench"),
            "trace.cpu_auto_cast": (auto_cast, "bench"),
            # bf16 moves single hidden values by up to ~0.8 while cosine stays >= 0.9999 (see the setting)
            "trace.max_abs_diff": ("0.05" if auto_cast == "none" else "1.0", "bench"),
        }
    )
    return run_trace(settings, progress=True, emit=print).directory


def _spin(*, model: Any, inputs: Any, stop: float, counts: list[int], index: int, step: int) -> None:
    while time.perf_counter() < stop:
        model.run(inputs)
        counts[index] += step


RawConfig = tuple[int, int, int]  # (batch size, copies, torch threads per copy)


def raw_configs(batch_sizes: tuple[int, ...], cores: int, copies: int) -> list[RawConfig]:
    """Every compiled batch size as ``copies`` x 1 thread (the server's arrangement) and 1 x all."""
    arrangements = {(copies, max(1, cores // copies)), (1, cores)}
    return [(b, n, t) for b in batch_sizes for n, t in sorted(arrangements)]


def label(config: RawConfig) -> str:
    b, n, t = config
    return f"b{b} {n}x{t}t"


@functools.cache
def manifest_of(artifacts: Path) -> Any:
    """The verified manifest, read once (verifying hashes every artifact file)."""
    from neuronserve.artifacts import load_manifest

    return load_manifest(artifacts)


@dataclasses.dataclass(frozen=True)
class _Row:
    """A work item's payload as build_inputs reads it."""

    encoded: Any


def padded_inputs(artifacts: Path, texts: list[str], seq: int, batch_size: int) -> tuple[Any, ...]:
    """``batch_size`` of ``texts`` (repeated as needed), tokenized and padded the way a copy does."""
    from neuronserve.serving.batcher import Batch, WorkItem
    from neuronserve.serving.copies import build_inputs
    from neuronserve.serving.tokenization import TextEncoder

    encoded = TextEncoder(artifacts, seq).encode(texts, truncate=False)
    rows = (encoded * batch_size)[:batch_size]
    items = tuple(WorkItem(e.length, 0.0, _Row(e)) for e in rows)
    import torch

    inputs, _ = build_inputs(Batch(seq, batch_size, items), manifest_of(artifacts).input_names)
    return tuple(torch.from_numpy(array) for array in inputs)


def warm_model(artifacts: Path, batch_size: int, seq: int, inputs: tuple[Any, ...]) -> Any:
    """One loaded copy of shape (batch_size, seq), past TorchScript's optimising first calls."""
    from neuronserve.backends.base import CoreSet
    from neuronserve.backends.cpu import CpuBackend

    cores = CoreSet(tuple(sorted(os.sched_getaffinity(0))))
    # A backend of its own per copy: this baseline measures independent copies.
    artifact = artifacts / manifest_of(artifacts).shape(batch_size, seq).file
    model = CpuBackend().load(artifact, cores, 0)
    for _ in range(3):
        model.run(inputs)
    return model


def raw_throughput(
    artifacts: Path, texts: list[str], seq: int, configs: list[RawConfig], duration_s: float
) -> dict[RawConfig, float]:
    """Items per second of the model in process (no HTTP), per (batch size, copies, threads)."""
    import torch

    results: dict[RawConfig, float] = {}
    for b, n_copies, threads in configs:
        inputs = padded_inputs(artifacts, texts, seq, b)
        torch.set_num_threads(threads)
        models = [warm_model(artifacts, b, seq, inputs) for _ in range(n_copies)]
        counts = [0] * n_copies
        started = time.perf_counter()
        stop = started + duration_s
        workers = [
            threading.Thread(
                target=_spin,
                kwargs={"model": m, "inputs": inputs, "stop": stop, "counts": counts, "index": i, "step": b},
            )
            for i, m in enumerate(models)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        results[(b, n_copies, threads)] = sum(counts) / (time.perf_counter() - started)
    return results


def raw_b1_latency(artifacts: Path, text: str, seq: int, threads: int) -> float:
    import torch

    inputs = padded_inputs(artifacts, [text], seq, 1)
    torch.set_num_threads(threads)
    model = warm_model(artifacts, 1, seq, inputs)
    times = []
    for _ in range(30):
        t = time.perf_counter()
        model.run(inputs)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Server:
    def __init__(self, artifacts: Path, copies: int, *settings: str) -> None:
        self.port = free_port()
        self.log = Path(f"/tmp/neuronserve-bench-{self.port}.log")
        args = [
            sys.executable,
            "-m",
            "neuronserve.cli",
            "serve",
            "--mode",
            "gunicorn",
            "--port",
            str(self.port),
        ]
        args += ["--artifacts", str(artifacts), "--copies", str(copies)]
        for item in settings:
            args += ["--set", item]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        wait_ready(f"http://127.0.0.1:{self.port}", self.process, self.log)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def served(port: int, texts: list[str], concurrency: int, duration_s: float) -> tuple[float, float, float]:
    """(requests/s, p50 seconds, mean x-batch-size) in a closed loop."""
    import asyncio

    payloads = [Payload(orjson.dumps({"inputs": t}), 0) for t in texts]
    plan = StepPlan("closed", concurrency, duration_s, warmup_s=min(3.0, duration_s / 3))
    records = asyncio.run(run_step(plan, [Target("127.0.0.1", port, "/predict")], payloads, {}))
    bad = [r.error for r in records if r.error]
    if bad:
        raise RuntimeError(f"non-200 answers during the benchmark: {sorted(set(bad))}")
    latencies = sorted(r.latency_s for r in records)
    return (
        len(records) / duration_s,
        percentile(latencies, 50),
        statistics.mean(r.batch_size for r in records),
    )


def best_raw(
    artifacts: Path, texts: list[str], seq: int, copies: int, duration_s: float
) -> tuple[RawConfig, dict[RawConfig, float]]:
    """Sweep every batch size and arrangement; the fastest is what 'raw' means from then on."""
    configs = raw_configs(manifest_of(artifacts).batch_sizes, len(os.sched_getaffinity(0)), copies)
    sweep = raw_throughput(artifacts, texts, seq, configs, duration_s)
    return max(sweep, key=lambda c: sweep[c]), sweep


def one_run(
    *,
    artifacts: Path,
    batched: Server,
    unbatched: Server,
    texts: dict[str, list[str]],
    best: dict[str, RawConfig],
    duration: float,
) -> dict[str, float]:
    """Raw and served measured back to back, so each ratio compares two adjacent windows."""
    figures: dict[str, float] = {}
    for kind, seq in (("long", 128), ("short", 16)):
        raw = raw_throughput(artifacts, texts[kind], seq, [best[kind]], duration / 2)
        figures[f"raw_{kind}"] = raw[best[kind]]
        figures[f"served_{kind}"], _, figures[f"batch_{kind}"] = served(
            batched.port, texts[kind], 16, duration
        )
    figures["unbatched_short"], _, _ = served(unbatched.port, texts["short"], 16, duration)
    figures["raw_b1_ms"] = raw_b1_latency(artifacts, texts["long"][0], 128, threads=1) * 1000
    _, p50, _ = served(batched.port, texts["long"][:1], 1, duration / 2)
    figures["served_c1_p50_ms"] = p50 * 1000
    figures["served_over_raw_long"] = figures["served_long"] / figures["raw_long"]
    figures["served_over_raw_short"] = figures["served_short"] / figures["raw_short"]
    figures["batching_gain_short"] = figures["served_short"] / figures["unbatched_short"]
    return figures


def measure(args: argparse.Namespace, auto_cast: str) -> dict[str, float]:
    """All runs for one precision; returns the medians."""
    artifacts = trace_artifacts(Path(args.output), auto_cast)
    counter = TokenCounter(artifacts)
    texts = {"long": texts_of_length(counter, 110, 126, 8), "short": texts_of_length(counter, 13, 16, 8)}
    print(
        f"\n== trace.cpu_auto_cast={auto_cast}: cores {sorted(os.sched_getaffinity(0))}, "
        f"copies {args.copies}, shapes b{BATCH_SIZES} x s{SEQUENCE_LENGTHS}",
        flush=True,
    )
    best: dict[str, RawConfig] = {}
    for kind, seq in (("long", 128), ("short", 16)):
        best[kind], sweep = best_raw(artifacts, texts[kind], seq, args.copies, args.duration / 4)
        shown = {label(c): round(v, 1) for c, v in sweep.items()}
        print(f"raw {kind} sweep (items/s): {shown}; best {label(best[kind])}", flush=True)
    runs = []
    with (
        Server(artifacts, args.copies) as batched,
        Server(artifacts, args.copies, "serve.max_batch_size=1") as unbatched,
    ):
        for i in range(args.runs):
            figures = one_run(
                artifacts=artifacts,
                batched=batched,
                unbatched=unbatched,
                texts=texts,
                best=best,
                duration=args.duration,
            )
            print(f"run {i + 1}/{args.runs}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
            runs.append(figures)
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"medians of {args.runs} runs (trace.cpu_auto_cast={auto_cast}):")
    print(
        f"  long texts (~120 tokens): raw {median['raw_long']:.1f} items/s ({label(best['long'])}), "
        f"served {median['served_long']:.1f} req/s (mean batch {median['batch_long']:.1f}), "
        f"served/raw = {median['served_over_raw_long']:.3f} (floor 0.90)"
    )
    print(
        f"  short texts (~15 tokens): raw {median['raw_short']:.1f} items/s ({label(best['short'])}), "
        f"served {median['served_short']:.1f} req/s (mean batch {median['batch_short']:.1f}), "
        f"served/raw = {median['served_over_raw_short']:.3f}"
    )
    print(
        f"  short texts, batching off (serve.max_batch_size=1): {median['unbatched_short']:.1f} req/s; "
        f"dynamic batching gain = {median['batching_gain_short']:.2f}x (floor 2.5x)"
    )
    print(
        f"  latency at concurrency 1 (long text): served p50 {median['served_c1_p50_ms']:.1f} ms vs raw b1 "
        f"call {median['raw_b1_ms']:.1f} ms (+{median['served_c1_p50_ms'] - median['raw_b1_ms']:.1f} ms)",
        flush=True,
    )
    return median


def deployment_throughput(args: argparse.Namespace) -> int:
    """The peer-comparison figure: requests/s of the default deployment on ~15-token texts.

    The bundled model is traced with the cpu defaults and deployed with `neuronserve deploy` at
    every default (one server per core, behind nginx); hey saturates it (closed loop,
    concurrency 64, one text per request, identical requests) for --duration seconds per run.
    """
    from bench.common import deployed, hey, trace_cpu

    work = Path(args.output).resolve() / "deployment"
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.properties").write_text("")
    trace_cpu(work, work / "trace")
    artifacts = work / "trace" / "all-MiniLM-L6-v2" / "cpu"
    text = texts_of_length(TokenCounter(artifacts), 14, 16, 1)[0]
    payload = work / "short.json"
    payload.write_bytes(orjson.dumps({"inputs": text}))
    cores = len(os.sched_getaffinity(0))
    # The bound: the model alone, one copy per core at 1 thread (the deployment's arrangement)
    # at its best batch size, in this process, before and after the served runs.
    raw_configs_ = [(b, cores, 1) for b in (8, 16, 32)]
    raws = [max(raw_throughput(artifacts, [text], 16, raw_configs_, args.duration / 2).values())]
    rates: list[float] = []
    with deployed(work, artifacts, "bench-deployment") as deployment:
        url = f"{deployment.url}/predict"
        hey(url, payload, 64, 2.0)  # warm-up, not measured
        for i in range(args.runs):
            run = hey(url, payload, 64, args.duration)
            rates.append(run.ok / run.seconds)
            print(f"run {i + 1}: {rates[-1]:.0f} req/s, non-200: {run.other_codes or 'none'}", flush=True)
    raws.append(max(raw_throughput(artifacts, [text], 16, raw_configs_, args.duration / 2).values()))
    served_rate, raw = statistics.median(rates), statistics.mean(raws)
    print(f"default deployment, ~15-token texts, concurrency 64: median {served_rate:.0f} req/s")
    print(
        f"the model alone on {cores} cores (no HTTP, best batch): {raw:.0f} texts/s "
        f"({' and '.join(f'{r:.0f}' for r in raws)}, before and after); served/raw {served_rate / raw:.2f}"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--deployment",
        action="store_true",
        help="instead: short-text saturation throughput of the default deployment (nginx, one server per core)",
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per served window")
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument(
        "--auto-cast",
        default="none,bf16",
        help="comma-separated trace.cpu_auto_cast values to measure: none (fp32) and/or bf16",
    )
    parser.add_argument("--output", default=str(REPO / "trace-models" / "bench"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.deployment:
        return deployment_throughput(args)
    precisions = [p.strip() for p in args.auto_cast.split(",") if p.strip()]
    if not precisions or set(precisions) - {"none", "bf16"}:
        parser.error(f"--auto-cast {args.auto_cast!r}: use none, bf16 or none,bf16")
    for auto_cast in precisions:
        measure(args, auto_cast)
    return 0


if __name__ == "__main__":
    sys.exit(main())
