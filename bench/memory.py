"""Memory and start-up of a real local deployment, by number of shapes and copies per server.

    python bench/memory.py [--runs 3] [--shapes 4,24] [--copies 1,2]

For S in --shapes (4: b1,8 x s32,128; 24: b1,2,4,8,16,32 x s16,32,64,128) the bundled
all-MiniLM-L6-v2 is traced on cpu (cached in a scratch directory), then for C in --copies it is
deployed with `neuronserve deploy` on every core of this host (one server per core, C copies
each, behind nginx) and measured, --runs times:
  ready     wall time from starting `neuronserve deploy` until it returns, i.e. until every
            server's /ready answered 200 (every copy answered every shape);
  at ready  RSS of every server process (gunicorn master + worker), summed per server (pages the
            two share are counted twice, so this errs high);
  loaded    the same right after bursts of 32-text 122-token requests, two per copy at once, so
            every copy runs the largest batch at s128: the working set of the heaviest batches;
  idle      the same once the servers have been idle long enough to return freed memory.
It prints every run and the medians next to the model's weight bytes and the per-server budget
of issue 10 (0.5 GB + 1.5 x weight bytes).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import deployed, trace_cpu  # noqa: E402

GRIDS = {
    4: ("1,8", "32,128"),
    24: ("1,2,4,8,16,32", "16,32,64,128"),
}
# 122 tokens: runs in the s128 bucket.
LONG_TEXT = " ".join(["serving transformer encoders on inferentia keeps every core busy"] * 8)
IDLE_WAIT_S = 4.0  # longer than the engine's idle trim delay


def trace(work: Path, shapes: int) -> Path:
    batches, lengths = GRIDS[shapes]
    out = f"trace-s{shapes}"
    trace_cpu(work, out, f"trace.batch_sizes={batches}", f"trace.sequence_lengths={lengths}")
    return work / out / "all-MiniLM-L6-v2" / "cpu"


def rss_bytes(pid: int) -> int:
    """RSS of ``pid`` and its children (a gunicorn master and its worker)."""
    total = 0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            for task in Path(f"/proc/{current}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def server_rss(work: Path, name: str) -> list[int]:
    from neuronserve.deploy.local import RunDir, Supervisor

    rd = RunDir(work / "run" / name)
    return [
        rss_bytes(int(p["pid"]))
        for p in sorted(Supervisor(rd).processes(), key=lambda p: str(p["name"]))
        if str(p["name"]).startswith("server-")
    ]


def heavy_load(url: str, copies: int, servers: int, rounds: int = 3) -> None:
    """Bursts of 32-text long requests, two per copy at once, so every copy runs b32 s128."""
    body = {"inputs": [LONG_TEXT] * 32}
    with (
        httpx.Client(timeout=120) as client,
        concurrent.futures.ThreadPoolExecutor(2 * copies * servers) as pool,
    ):
        for _ in range(rounds):
            replies = list(
                pool.map(lambda _i: client.post(f"{url}/predict", json=body), range(2 * copies * servers))
            )
            bad = [r.status_code for r in replies if r.status_code != 200]
            if bad:
                raise SystemExit(f"load failed with status {bad[:3]}: {replies[0].text[:300]}")


@dataclass(frozen=True)
class Figures:
    """One deployment's start-up time and per-server RSS (bytes) in three states."""

    ready_s: float
    at_ready: list[int]
    loaded: list[int]
    idle: list[int]


def measure(work: Path, artifacts: Path, copies: int) -> Figures:
    name = "bench-memory"
    with deployed(work, artifacts, name, f"serve.models_per_server={copies}") as deployment:
        ready_s = deployment.ready_s
        at_ready = server_rss(work, name)
        heavy_load(deployment.url, copies, len(at_ready))
        loaded = server_rss(work, name)
        time.sleep(IDLE_WAIT_S)  # the state measured is "idle for a while", not a synchronisation
        idle = server_rss(work, name)
    return Figures(ready_s, at_ready, loaded, idle)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--shapes", default="4,24", help="comma-separated: 4 and/or 24")
    parser.add_argument("--copies", default="1,2")
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch directory (default: a temporary one)"
    )
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="neuronserve-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.properties").write_text("# bench/memory.py: defaults, overridden with --set\n")
    rows = []
    for shapes in (int(s) for s in args.shapes.split(",")):
        artifacts = trace(work, shapes)
        manifest = json.loads((artifacts / "manifest.json").read_text())
        weights = int(manifest["memory"]["weight_bytes"])
        budget = 0.5e9 + 1.5 * weights
        for copies in (int(c) for c in args.copies.split(",")):
            runs: list[Figures] = []
            for run in range(args.runs):
                f = measure(work, artifacts, copies)
                runs.append(f)
                print(
                    f"S={shapes:<3} C={copies} run {run + 1}: ready {f.ready_s:.1f} s; RSS per server (GB) "
                    f"at ready {[gb(x) for x in f.at_ready]}, loaded {[gb(x) for x in f.loaded]}, "
                    f"idle {[gb(x) for x in f.idle]}",
                    flush=True,
                )
            rows.append(
                (
                    shapes,
                    copies,
                    len(runs[0].at_ready),
                    statistics.median(r.ready_s for r in runs),
                    statistics.median(sum(r.at_ready) for r in runs),
                    statistics.median(max(r.at_ready) for r in runs),
                    statistics.median(max(r.loaded) for r in runs),
                    statistics.median(max(r.idle) for r in runs),
                    budget,
                    weights,
                )
            )
    print()
    print(f"medians of {args.runs} runs; RSS in GB; largest server shown per column")
    print(
        f"{'shapes':>6} {'copies':>6} {'servers':>7} {'ready s':>8} {'total@ready':>11} "
        f"{'@ready':>7} {'loaded':>7} {'idle':>7} {'budget':>7} {'weights':>8}"
    )
    for shapes, copies, servers, ready, total, at_ready, loaded, idle, budget, weights in rows:
        print(
            f"{shapes:>6} {copies:>6} {servers:>7} {ready:>8.1f} {gb(total):>11} {gb(at_ready):>7} "
            f"{gb(loaded):>7} {gb(idle):>7} {gb(budget):>7} {gb(weights):>8}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
