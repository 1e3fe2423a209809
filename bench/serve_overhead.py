"""Served vs raw throughput, and dynamic batching vs none, measured in one run on this machine.

    python bench/serve_overhead.py [--runs 3] [--duration 10] [--copies 2]

On the same cores and compiled shapes it measures, per run:
  raw       in-process model throughput (no HTTP) at the best compiled batch size, as 2 copies x
            1 thread (the server's arrangement) and 1 copy x all threads; the better one counts;
  served    throughput through the real server (gunicorn, one uvicorn worker) at saturation:
            closed loop, concurrency 16, one text per request;
  unbatched the same server with serve.max_batch_size=1, on short texts;
  latency   served p50 at concurrency 1 against one raw batch-1 call (1 thread per copy).
It prints every run and the medians: served/raw for ~120-token texts, and batched/unbatched
throughput for ~15-token texts.
"""

from __future__ import annotations

import argparse
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

from neuronserve.loadgen.http import Payload, StepPlan, Target, run_step  # noqa: E402
from neuronserve.loadgen.payloads import TokenCounter  # noqa: E402
from neuronserve.loadgen.stats import percentile  # noqa: E402

BATCH_SIZES = "1,2,4,8,16,32"
SEQUENCE_LENGTHS = "16,128"
WORDS = [
    "serving",
    "transformer",
    "encoders",
    "on",
    "inferentia",
    "keeps",
    "every",
    "core",
    "busy",
    "when",
    "requests",
    "arrive",
    "together",
    "and",
    "the",
    "batcher",
    "pads",
    "them",
    "to",
    "compiled",
    "shapes",
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


def trace_artifacts(out: Path) -> Path:
    from neuronserve.config import build_settings
    from neuronserve.trace import run_trace

    settings = build_settings(
        {
            "trace.backend": ("cpu", "bench"),
            "trace.batch_sizes": (BATCH_SIZES, "bench"),
            "trace.sequence_lengths": (SEQUENCE_LENGTHS, "bench"),
            "trace.output_dir": (str(out), "bench"),
        }
    )
    return run_trace(settings, progress=True, emit=print).directory


def _spin(*, model: Any, inputs: Any, stop: float, counts: list[int], index: int, step: int) -> None:
    while time.perf_counter() < stop:
        model.run(inputs)
        counts[index] += step


def raw_throughput(
    artifacts: Path, texts: list[str], seq: int, copies: int, duration_s: float
) -> dict[str, float]:
    """Items per second of the model in process, per batch size and thread arrangement."""
    import torch

    from neuronserve.artifacts import load_manifest
    from neuronserve.backends.base import CoreSet
    from neuronserve.backends.cpu import CpuBackend
    from neuronserve.serving.batcher import Batch, WorkItem
    from neuronserve.serving.copies import build_inputs
    from neuronserve.serving.tasks import ItemOptions
    from neuronserve.serving.tokenization import TextEncoder

    manifest = load_manifest(artifacts)
    encoder = TextEncoder(artifacts, seq)
    encoded = encoder.encode(texts, truncate=False)
    backend = CpuBackend()
    cores = CoreSet(tuple(sorted(os.sched_getaffinity(0))))
    results: dict[str, float] = {}
    for b in manifest.batch_sizes:
        items = tuple(WorkItem(e.length, 0.0, (e, ItemOptions())) for e in (encoded * b)[:b])
        inputs, _ = build_inputs(Batch(seq, b, items), manifest.input_names)
        for threads_per_copy, n_copies in ((max(1, len(cores) // copies), copies), (len(cores), 1)):
            torch.set_num_threads(threads_per_copy)
            models = [backend.load(artifacts / f"model-b{b}-s{seq}.pt", cores) for _ in range(n_copies)]
            for m in models:  # TorchScript optimises on its first calls
                for _ in range(3):
                    m.run(inputs)
            counts = [0] * n_copies
            stop = time.perf_counter() + duration_s

            started = time.perf_counter()
            workers = [
                threading.Thread(
                    target=_spin,
                    kwargs={
                        "model": m,
                        "inputs": inputs,
                        "stop": stop,
                        "counts": counts,
                        "index": i,
                        "step": b,
                    },
                )
                for i, m in enumerate(models)
            ]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            results[f"b{b} {n_copies}x{threads_per_copy}t"] = sum(counts) / (time.perf_counter() - started)
    return results


def raw_b1_latency(artifacts: Path, text: str, seq: int, threads: int) -> float:
    import torch

    from neuronserve.artifacts import load_manifest
    from neuronserve.backends.base import CoreSet
    from neuronserve.backends.cpu import CpuBackend
    from neuronserve.serving.batcher import Batch, WorkItem
    from neuronserve.serving.copies import build_inputs
    from neuronserve.serving.tasks import ItemOptions
    from neuronserve.serving.tokenization import TextEncoder

    manifest = load_manifest(artifacts)
    enc = TextEncoder(artifacts, seq).encode([text], truncate=False)[0]
    inputs, _ = build_inputs(
        Batch(seq, 1, (WorkItem(enc.length, 0.0, (enc, ItemOptions())),)), manifest.input_names
    )
    torch.set_num_threads(threads)
    model = CpuBackend().load(artifacts / f"model-b1-s{seq}.pt", CoreSet((0,)))
    for _ in range(3):
        model.run(inputs)
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


def one_run(
    artifacts: Path, long_texts: list[str], short_texts: list[str], copies: int, duration: float
) -> dict[str, float]:
    figures: dict[str, float] = {}
    raw_long = raw_throughput(artifacts, long_texts, 128, copies, duration / 2)
    raw_short = raw_throughput(artifacts, short_texts, 16, copies, duration / 2)
    figures["raw_long"] = max(raw_long.values())
    figures["raw_short"] = max(raw_short.values())
    print("  raw long  (items/s):", {k: round(v, 1) for k, v in raw_long.items()}, flush=True)
    print("  raw short (items/s):", {k: round(v, 1) for k, v in raw_short.items()}, flush=True)
    figures["raw_b1_ms"] = raw_b1_latency(artifacts, long_texts[0], 128, threads=1) * 1000

    srv = Server(artifacts, copies)
    try:
        figures["served_long"], _, figures["batch_long"] = served(srv.port, long_texts, 16, duration)
        figures["served_short"], _, figures["batch_short"] = served(srv.port, short_texts, 16, duration)
        _, p50, _ = served(srv.port, long_texts[:1], 1, duration / 2)
        figures["served_c1_p50_ms"] = p50 * 1000
    finally:
        srv.stop()
    srv = Server(artifacts, copies, "serve.max_batch_size=1")
    try:
        figures["unbatched_short"], _, _ = served(srv.port, short_texts, 16, duration)
    finally:
        srv.stop()
    figures["served_over_raw_long"] = figures["served_long"] / figures["raw_long"]
    figures["served_over_raw_short"] = figures["served_short"] / figures["raw_short"]
    figures["batching_gain_short"] = figures["served_short"] / figures["unbatched_short"]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per served measurement")
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "trace-models" / "bench"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    artifacts = trace_artifacts(Path(args.output))
    counter = TokenCounter(artifacts)
    long_texts = texts_of_length(counter, 110, 126, 8)
    short_texts = texts_of_length(counter, 13, 16, 8)
    print(
        f"cores: {sorted(os.sched_getaffinity(0))}, copies: {args.copies}, shapes b{BATCH_SIZES} x s{SEQUENCE_LENGTHS}"
    )
    runs = []
    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}", flush=True)
        figures = one_run(artifacts, long_texts, short_texts, args.copies, args.duration)
        print("  " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)
        runs.append(figures)
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"\nmedians of {args.runs} runs")
    print(
        f"long texts (~120 tokens): raw {median['raw_long']:.1f} items/s, served {median['served_long']:.1f} req/s "
        f"(mean batch {median['batch_long']:.1f}), served/raw = {median['served_over_raw_long']:.3f}"
    )
    print(
        f"short texts (~15 tokens): raw {median['raw_short']:.1f} items/s, served {median['served_short']:.1f} req/s "
        f"(mean batch {median['batch_short']:.1f}), served/raw = {median['served_over_raw_short']:.3f}"
    )
    print(
        f"short texts, batching off (serve.max_batch_size=1): {median['unbatched_short']:.1f} req/s; "
        f"dynamic batching gain = {median['batching_gain_short']:.2f}x"
    )
    print(
        f"latency at concurrency 1 (long text): served p50 {median['served_c1_p50_ms']:.1f} ms vs raw b1 call "
        f"{median['raw_b1_ms']:.1f} ms (+{median['served_c1_p50_ms'] - median['raw_b1_ms']:.1f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
