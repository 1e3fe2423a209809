"""How fast /health and /ready answer while the deployment is overloaded, measured.

    python bench/probes_under_load.py [--runs 3] [--rate 300] [--duration 6]

Kubernetes probes (and Docker's HEALTHCHECK) give up after their timeout: a server whose probes
queue behind its own model work under overload leaves the Service, or is restarted, exactly when
it is busiest. This deploys the bundled all-MiniLM-L6-v2 (traced on cpu at b1,8 x s32,128, the
tests' grid) at its defaults behind nginx and, per run:
  load    --rate requests/s of a 3-sentence text (~60 tokens) for --duration seconds from hey
          (1000 clients, each held to its share of the rate), through nginx: several times what
          the deployment serves, so queues fill and the excess gets 429/503;
  probes  a second process probing server 0's /health and /ready directly every 100 ms (as a
          kubelet would), each on a new connection with a 10 s timeout.
It prints, per run and as medians over runs, the probes' p50, p99 and max, the load's answers by
status, and the emitted Kubernetes base's probe timeout next to the measured max.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import deployed, trace_cpu  # noqa: E402

NAME = "bench-probes"
TEXT = "Static shapes mean every request is padded to a compiled sequence length and batch size. " * 3
PROBE_INTERVAL_S = 0.1
LOAD_CLIENTS = 1000


def _load(url: str, rate: float, duration: float, payload: Path) -> subprocess.Popen[str]:
    """hey (Go, so the client is never what limits the rate): LOAD_CLIENTS clients, each capped
    at its share of ``rate``. Past saturation nginx and the servers answer the excess at once, so
    the clients keep their pace and the offered rate holds."""
    tool = shutil.which("hey")
    if tool is None:
        raise SystemExit("hey not found: sudo apt-get install -y hey (the Debian package)")
    return subprocess.Popen(
        [tool, "-z", f"{duration}s", "-c", str(LOAD_CLIENTS), "-q", f"{rate / LOAD_CLIENTS:.3f}",
         "-m", "POST", "-T", "application/json", "-D", str(payload), f"{url}/predict"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _probe(port: int, path: str) -> float:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    return time.perf_counter() - started


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_run(url: str, server_port: int, rate: float, duration: float, payload: Path) -> dict[str, object]:
    load = _load(url, rate, duration, payload)
    seen: dict[str, list[float]] = {"/health": [], "/ready": []}
    while load.poll() is None:
        for path, values in seen.items():
            values.append(_probe(server_port, path))
        time.sleep(PROBE_INTERVAL_S)  # the probe period, as a kubelet's periodSeconds
    stdout, stderr = load.communicate()
    if load.returncode != 0:
        raise SystemExit(f"hey failed: {stderr[-2000:]}")
    codes = {code: int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", stdout)}
    out: dict[str, object] = {"codes": codes}
    for path, values in seen.items():
        out[path] = {
            "p50": _percentile(values, 0.5),
            "p99": _percentile(values, 0.99),
            "max": max(values),
            "n": len(values),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--duration", type=float, default=6.0)
    args = parser.parse_args()
    from neuronserve.deploy.plan import PROBE_TIMEOUT_S

    with tempfile.TemporaryDirectory(prefix="bench-probes-") as scratch:
        work = Path(scratch)
        (work / "config.properties").write_text("")
        trace_cpu(work, "trace", "trace.batch_sizes=1,8", "trace.sequence_lengths=32,128")
        artifacts = work / "trace" / "all-MiniLM-L6-v2" / "cpu"
        payload = work / "payload.json"
        payload.write_text(json.dumps({"inputs": TEXT}))
        with deployed(work, artifacts, NAME) as deployment:
            from neuronserve.deploy.local import RunDir

            plan = json.loads(RunDir(work / "run" / NAME).plan.read_text())
            port = int(plan["servers"][0]["port"])
            runs = []
            for i in range(args.runs):
                result = one_run(deployment.url, port, args.rate, args.duration, payload)
                runs.append(result)
                line = "  ".join(
                    f"{path} p50 {r['p50'] * 1000:.0f} p99 {r['p99'] * 1000:.0f} max {r['max'] * 1000:.0f} ms"
                    for path in ("/health", "/ready")
                    if isinstance(r := result[path], dict)
                )
                print(f"run {i + 1}: {line}  load {result['codes']}", flush=True)
    print(f"\nmedians of {args.runs} runs at {args.rate:.0f} req/s for {args.duration:.0f} s:")
    for path in ("/health", "/ready"):
        figures = {
            key: statistics.median(float(r[path][key]) for r in runs)  # type: ignore[index]
            for key in ("p50", "p99", "max")
        }
        print(
            f"  {path:<8} p50 {figures['p50'] * 1000:6.1f} ms  p99 {figures['p99'] * 1000:6.1f} ms  "
            f"max {figures['max'] * 1000:6.1f} ms"
        )
    print(f"probe timeout of the Kubernetes base and Docker's HEALTHCHECK: {PROBE_TIMEOUT_S} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
