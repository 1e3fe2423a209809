"""Start-up and memory of a text-generation deployment, measured: how long `neuronserve deploy`
takes until every engine copy answers, and what each copy holds.

    python bench/generate_ready.py [--runs 3] [--set KEY=VALUE ...]

It prepares the bundled SmolLM2-135M-Instruct (`neuronserve trace`, cached after the first
run), then deploys it --runs times at its defaults (on a 2-CPU host: two copies of one core each),
and prints per run the seconds until ready and, per copy, the RSS and PSS of its processes (the
API server, its engine core and their helpers: PSS counts shared pages once), then the medians.
It also times one greedy answer of 32 tokens through the endpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.servers import free_port  # noqa: E402

from bench.common import neuronserve  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of ``pid``."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    return rss, pss


def _tree(pid: int) -> list[int]:
    from neuronserve.deploy.local import children

    found = [pid]
    for child in children(pid):
        found += _tree(child)
    return found


def copy_memory(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Copy name -> (RSS, PSS) summed over its engine's processes (the keeper not counted)."""
    from neuronserve.deploy.local import RunDir, Supervisor, children

    out = {}
    for process in Supervisor(RunDir(run_dir)).processes():
        if not str(process["name"]).startswith("copy-") or not process["pid"]:
            continue
        rss = pss = 0
        for engine in children(int(process["pid"])):
            for pid in _tree(engine):
                r, p = _memory(pid)
                rss, pss = rss + r, pss + p
        out[str(process["name"])] = (rss, pss)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="extra setting, key=value")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="generate-ready-"))
    try:
        (work / "config.properties").write_text(
            f"model.source=bundled:{MODEL}\nmodel.task=text-generation\nmonitor.enabled=false\n"
        )
        base = [a for kv in [f"deploy.run_dir={work / 'run'}", *args.set] for a in ("--set", kv)]
        started = time.perf_counter()
        neuronserve(work, "trace", *base)
        print(
            f"prepared {MODEL} (and the engine's environment when missing) in {time.perf_counter() - started:.0f} s"
        )
        readies: list[float] = []
        per_copy: list[tuple[int, int]] = []
        answers: list[float] = []
        for run in range(1, args.runs + 1):
            port = free_port()
            sets = [*base, "--set", f"deploy.port={port}", "--set", f"deploy.base_port={free_port(8)}"]
            started = time.perf_counter()
            neuronserve(work, "deploy", *sets)
            ready = time.perf_counter() - started
            try:
                memory = copy_memory(work / "run" / "neuronserve")
                began = time.perf_counter()
                reply = httpx.post(
                    f"http://127.0.0.1:{port}/v1/completions",
                    json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 32,
                          "temperature": 0, "ignore_eos": True},
                    timeout=120,
                )  # fmt: skip
                reply.raise_for_status()
                answers.append(time.perf_counter() - began)
            finally:
                neuronserve(work, "cleanup", *sets, check=False)
            readies.append(ready)
            per_copy += memory.values()
            copies = "  ".join(
                f"{name} RSS {r / 2**30:.2f} GiB PSS {p / 2**30:.2f} GiB"
                for name, (r, p) in sorted(memory.items())
            )
            print(
                f"run {run}: ready in {ready:.1f} s; {copies}; 32 tokens in {answers[-1]:.2f} s", flush=True
            )
        rss = statistics.median(r for r, _ in per_copy)
        pss = statistics.median(p for _, p in per_copy)
        print(
            f"\nmedians of {args.runs} runs on {len(os.sched_getaffinity(0))} CPUs: deploy until every copy is ready "
            f"{statistics.median(readies):.1f} s (min {min(readies):.1f}, max {max(readies):.1f}); per copy RSS "
            f"{rss / 2**30:.2f} GiB, PSS {pss / 2**30:.2f} GiB; one greedy answer of 32 tokens "
            f"{statistics.median(answers):.2f} s ({32 / statistics.median(answers):.1f} tokens/s alone)"
        )
        print(
            json.dumps(
                {
                    "ready_s": readies,
                    "rss_bytes": [r for r, _ in per_copy],
                    "pss_bytes": [p for _, p in per_copy],
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
