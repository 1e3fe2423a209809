"""run_apis.py against hey (an independent Go load tool) on the same server, body and concurrency.

    python bench/loadgen_vs_hey.py [--runs 3] [--seconds 6] [--concurrency 4]

Starts a server on the bundled model's artifacts (tracing them if needed), then alternates hey
and run_apis.py closed-loop runs so slow drifts of a shared machine hit both, and prints the
medians and the ratios of throughput and p50 latency.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.servers import start_server  # noqa: E402

from bench.serve_overhead import trace_artifacts  # noqa: E402
from neuronserve.loadgen.cli import main as run_apis  # noqa: E402

TEXT = "Dynamic batching groups requests that arrive together into one call of the model."


def hey(url: str, concurrency: int, seconds: int) -> tuple[float, float]:
    body = json.dumps({"inputs": TEXT})
    out = subprocess.run(
        [
            "hey",
            "-z",
            f"{seconds}s",
            "-c",
            str(concurrency),
            "-m",
            "POST",
            "-T",
            "application/json",
            "-d",
            body,
            f"{url}/predict",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50%+ in ([\d.]+) secs", out)
    if rps is None or p50 is None:
        raise RuntimeError(f"unexpected hey output:\n{out}")
    return float(rps.group(1)), float(p50.group(1)) * 1000


def ours(url: str, concurrency: int, seconds: int, out: Path, index: int) -> tuple[float, float]:
    dataset = out / "one.txt"
    dataset.write_text(TEXT + "\n")
    name = f"vs-hey-{index}"
    args = [
        "--target",
        url,
        "--concurrency",
        str(concurrency),
        "--duration",
        str(seconds),
        "--warmup",
        "1",
        "--dataset",
        str(dataset),
        "--output",
        str(out),
        "--name",
        name,
        "--no-progress",
    ]
    if run_apis(args) != 0:
        raise RuntimeError("run_apis failed")
    (step,) = json.loads(next(out.glob(f"{name}-*/summary.json")).read_text())["steps"]
    return float(step["rps"]), float(step["latency_ms"]["p50"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    if shutil.which("hey") is None:
        print("hey is not installed: apt-get install hey", file=sys.stderr)
        return 1
    artifacts = trace_artifacts(REPO / "trace-models" / "bench", "none")
    with (
        tempfile.TemporaryDirectory() as tmp,
        start_server(artifacts, Path(tmp), "serve.max_queue=4096") as srv,
    ):
        pairs = []
        for i in range(args.runs):
            pairs.append(
                (
                    hey(srv.url, args.concurrency, args.seconds),
                    ours(srv.url, args.concurrency, args.seconds, Path(tmp), i),
                )
            )
            print(
                f"run {i + 1}: hey {pairs[-1][0][0]:.1f} req/s p50 {pairs[-1][0][1]:.1f} ms; "
                f"run_apis {pairs[-1][1][0]:.1f} req/s p50 {pairs[-1][1][1]:.1f} ms",
                flush=True,
            )
    h_rps = statistics.median(p[0][0] for p in pairs)
    h_p50 = statistics.median(p[0][1] for p in pairs)
    o_rps = statistics.median(p[1][0] for p in pairs)
    o_p50 = statistics.median(p[1][1] for p in pairs)
    print(f"\nmedians of {args.runs} runs at concurrency {args.concurrency}, {args.seconds} s each")
    print(f"throughput: run_apis {o_rps:.1f} req/s vs hey {h_rps:.1f} req/s, ratio {o_rps / h_rps:.3f}")
    print(f"p50:        run_apis {o_p50:.1f} ms vs hey {h_p50:.1f} ms, ratio {o_p50 / h_p50:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
