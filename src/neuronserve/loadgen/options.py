"""The load client's options, shared by ``python run_apis.py`` and ``neuronserve bench``.

Kept apart from :mod:`neuronserve.loadgen.cli` so that ``neuronserve --help`` declares them
without importing the client.
"""

from __future__ import annotations

import argparse
import typing

from neuronserve.config import BenchSettings

DESCRIPTION = (
    "Sweep concurrency (closed loop) or request rate (open loop, Poisson) against neuronserve "
    "servers, or (--api) streamed requests against an OpenAI-compatible generative endpoint, and "
    "write a report: requests.csv, summary.json, report.md, plots."
)

SHORTCUTS = {
    "target": "bench.target",
    "route": "bench.route",
    "mode": "bench.mode",
    "concurrency": "bench.concurrency",
    "rates": "bench.rates",
    "duration": "bench.duration_s",
    "warmup": "bench.warmup_s",
    "requests": "bench.requests",
    "processes": "bench.processes",
    "dataset": "bench.dataset",
    "buckets": "bench.token_buckets",
    "name": "bench.name",
    "output": "bench.output_dir",
    "instance_type": "bench.instance_type",
    "model": "bench.model",
    "api": "bench.api",
    "input_len": "bench.input_len",
    "output_len": "bench.output_len",
    "num_prompts": "bench.num_prompts",
    "seed": "bench.seed",
    "tokenizer": "bench.tokenizer",
    "ttft_budget": "bench.ttft_budget_ms",
    "tpot_budget": "bench.tpot_budget_ms",
    "goodput": "bench.goodput",
    "engine_metrics": "bench.engine_metrics",
    "extra_body": "bench.extra_body",
    "ignore_eos": "bench.ignore_eos",
}


def build_parser() -> argparse.ArgumentParser:
    """``python run_apis.py``'s parser."""
    parser = argparse.ArgumentParser(prog="run_apis.py", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of the load client; each is also a bench.* key (see SHORTCUTS)."""
    parser.add_argument("--config", metavar="PATH", help="config.properties (bench.* keys)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--target", help="server URL(s), comma-separated (default: the deployment endpoint)")
    parser.add_argument("--route", choices=typing.get_args(typing.get_type_hints(BenchSettings)["route"]))
    parser.add_argument("--mode", choices=("closed", "open"))
    parser.add_argument("--concurrency", help="closed-loop levels, e.g. 1,4,16")
    parser.add_argument("--rates", help="open-loop rates (req/s), e.g. 5,10,20")
    parser.add_argument("--duration", help="measured seconds per step")
    parser.add_argument("--warmup", help="warm-up seconds per step (not counted)")
    parser.add_argument("--requests", help="measured requests per step instead of a duration")
    parser.add_argument("--processes", help="client processes")
    parser.add_argument("--dataset", help="JSON lines, CSV or text file of inputs")
    parser.add_argument("--buckets", help="token-length buckets, e.g. 1-32,33-128 (one run each)")
    parser.add_argument("--name", help="run name (report directory prefix)")
    parser.add_argument("--output", help="results directory")
    parser.add_argument("--instance-type", dest="instance_type", help="for the cost figures")
    parser.add_argument(
        "--model", help="the model to load (bench.model; v2 default: the server's only model, from /info)"
    )
    generative = parser.add_argument_group(
        "generative endpoints (streamed; TTFT, TPOT, ITL, E2EL, output tokens/s, goodput, cost per 1M tokens)"
    )
    generative.add_argument("--api", choices=("openai-chat", "openai-completions"), help="bench.api")
    generative.add_argument("--input-len", dest="input_len", help="random prompts' tokens")
    generative.add_argument("--output-len", dest="output_len", help="tokens asked for per answer")
    generative.add_argument("--num-prompts", dest="num_prompts", help="requests per step")
    generative.add_argument("--seed", help="seed of the random prompts and arrivals")
    generative.add_argument(
        "--ignore-eos",
        dest="ignore_eos",
        action="store_const",
        const="true",
        help="exactly --output-len tokens",
    )
    generative.add_argument("--tokenizer", help="the model's directory or tokenizer.json")
    generative.add_argument("--ttft-budget", dest="ttft_budget", help="p95 TTFT budget (ms)")
    generative.add_argument("--tpot-budget", dest="tpot_budget", help="p95 TPOT budget (ms)")
    generative.add_argument("--goodput", help="SLOs, e.g. ttft:2000,tpot:100")
    generative.add_argument("--engine-metrics", dest="engine_metrics", help="engines' /metrics URLs")
    generative.add_argument(
        "--extra-body", dest="extra_body", help='JSON merged into requests, e.g. {"temperature":0}'
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--compare", nargs=2, metavar=("A", "B"), help="print a regression table between two runs"
    )
