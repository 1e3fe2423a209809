"""``neuronserve acceptance``: prove the stack on a real host, end to end, and write a report.

doctor, then trace (batch 1 and 8 x sequence 128), deploy, a closed-loop load of ~120-token
texts at rising concurrency, cleanup; the report compares the best served throughput with
AWS's published figure for the same model, shapes and instance where there is one (AWS
measured the model alone, without HTTP, so the ratio is what serving keeps of it). Each step
runs the project's own command, as a user would.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Sequences/s that AWS published for (instance, model, batch, sequence length): NeuronPerf, no
# HTTP, fp32 weights with matmult bf16 auto-cast (the Neuron "Inf2 Inference Performance" page).
PUBLISHED = {("inf2.xlarge", "bert-base-uncased", 8, 128): 2674.19}
WORDS = (
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
)


@dataclass(frozen=True)
class Step:
    """One command of the run, and what it printed."""

    name: str
    command: list[str]
    returncode: int
    output: str


def _run(name: str, command: list[str], log: list[Step]) -> Step:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    step = Step(name, command, done.returncode, (done.stdout + done.stderr)[-6000:])
    log.append(step)
    print(f"{name}: exit {done.returncode}", flush=True)
    return step


def long_texts(path: Path, count: int = 32) -> Path:
    """A JSON-lines dataset of 85-word texts (110-120 tokens with BERT's vocabulary: the s128
    bucket, as AWS's sequence-length-128 figure)."""
    lines = []
    for i in range(count):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(85)]
        lines.append(json.dumps({"text": " ".join(words)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run(
    *,
    backend: str,
    model: str,
    instance_type: str,
    concurrency: str,
    duration_s: float,
    output: Path,
    settings: Sequence[str] = (),
) -> int:
    """Run every step (cleanup always), write ``report.md`` in ``output``; 0 when all passed."""
    output.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "neuronserve.cli"]
    common = [
        *("--set", f"trace.backend={backend}", "--set", f"model.source={model}"),
        *("--set", "trace.batch_sizes=1,8", "--set", "trace.sequence_lengths=128"),
        *("--set", "deploy.name=acceptance", "--set", "monitor.enabled=false"),
    ]
    for item in settings:
        common += ["--set", item]
    steps: list[Step] = []
    ok = _run("doctor", [*cli, "doctor", *common], steps).returncode == 0
    ok = ok and _run("trace", [*cli, "trace", "--quiet", *common], steps).returncode == 0
    summary: dict[str, Any] | None = None
    attempted = ok  # a deploy that fails halfway may have started some servers: clean up then too
    try:
        if ok and _run("deploy", [*cli, "deploy", *common], steps).returncode == 0:
            dataset = long_texts(output / "texts.jsonl")
            load = [sys.executable, "-m", "neuronserve.loadgen.cli", *common, "--concurrency", concurrency]
            load += ["--duration", str(duration_s), "--warmup", "1", "--dataset", str(dataset)]
            load += [
                "--name",
                "load",
                "--output",
                str(output),
                "--instance-type",
                instance_type,
                "--no-progress",
            ]
            if _run("load", load, steps).returncode == 0:
                found = sorted(output.glob("load-*/summary.json"))
                summary = json.loads(found[-1].read_text()) if found else None
    finally:
        if attempted:
            _run("cleanup", [*cli, "cleanup", *common], steps)
    passed = all(s.returncode == 0 for s in steps) and _served(summary) > 0
    (output / "report.md").write_text(
        _report(steps, summary, backend=backend, model=model, instance=instance_type, passed=passed)
    )
    print(f"report: {output / 'report.md'}")
    return 0 if passed else 1


def _best(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The load step with the highest throughput among those with under 1% errors."""
    rows = summary.get("steps") if summary is not None else None
    good = [r for r in rows if float(r["error_rate"]) < 0.01 and r["ok"]] if isinstance(rows, list) else []
    return max(good, key=lambda r: float(r["rps"])) if good else None


def _served(summary: dict[str, Any] | None) -> float:
    best = _best(summary)
    return float(best["rps"]) if best is not None else 0.0


def _throughput(best: dict[str, Any] | None, name: str, instance: str) -> list[str]:
    if best is None:
        return ["No load step served with under 1% errors (see load below)."]
    served = float(best["rps"])
    lines = [
        f"Best: **{served:.1f} sequences/s** at concurrency {best['level']:g} "
        f"(p95 {best['latency_ms']['p95']:.1f} ms, mean batch {best['mean_batch_size']:.1f}), "
        "one ~120-token text per request, batch sizes 1 and 8 at sequence length 128.",
        "",
    ]
    published = PUBLISHED.get((instance, name, 8, 128))
    if published is None:
        lines.append(
            f"AWS publishes no figure for {name} on {instance} at batch 8 x 128, so there is no "
            "ratio (AWS's anchor: bert-base-uncased on inf2.xlarge, 2674.19 sequences/s)."
        )
    else:
        lines.append(
            f"AWS's figure for {name} on {instance} at batch 8 x 128 (model alone, no HTTP): "
            f"{published:.2f} sequences/s; served / published = **{served / published:.3f}**."
        )
    return lines


def _report(
    steps: list[Step],
    summary: dict[str, Any] | None,
    *,
    backend: str,
    model: str,
    instance: str,
    passed: bool,
) -> str:
    name = model.rsplit("/", 1)[-1].removeprefix("bundled:")
    lines = [
        f"# Acceptance run: {name} on {backend} ({instance})",
        "",
        f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}; "
        f"result: **{'passed' if passed else 'FAILED'}**",
        "",
        "| step | exit |",
        "|---|---|",
        *(f"| {s.name} | {s.returncode} |" for s in steps),
        "",
    ]
    lines += ["## Served throughput", "", *_throughput(_best(summary), name, instance), ""]
    for s in steps:
        lines += [f"## {s.name}", "", f"`{' '.join(s.command[2:])}`", "", "```", s.output.strip(), "```", ""]
    return "\n".join(lines)
