"""``neuronserve tune`` for a text-generation model: the deployment that serves its workload best.

Candidates are the layouts the memory plan accepts: every tensor-parallel degree (cores per copy;
on cpu, a copy's threads) that divides the cores (and, on Neuron, the model's heads), as many
copies as fit (``deploy.servers=max``), times each ``generate.max_num_seqs`` asked for
(``--max-num-seqs``). A layout whose KV cache does not fit at ``generate.max_model_len`` is tried
again at the shortest length the workload needs (prompt + answer), which is then part of it.

Each candidate is deployed on free ports, loaded with the streaming client (the same prompts for
every candidate: bench.* as ``neuronserve bench --api`` reads them, closed loop over
bench.concurrency or open loop over bench.rates), scored by its best step inside the budgets
(output tokens/s, or goodput with bench.goodput objectives) and torn down before the next starts.
The time budget is kept: a candidate whose trial would not finish in what is left is skipped and
said so. ``results/tune-<stamp>/``: report.md, summary.json and tuned.properties (a complete
config that deploys as it is).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuronserve.config import ConfigError, Settings, load_settings
from neuronserve.deploy.memory import MemoryPlanError
from neuronserve.loadgen.http import auth_headers
from neuronserve.tune.run import (
    EXIT_INTERRUPTED,
    PATH_KEYS,
    TuneOptions,
    absolute_paths,
    interrupt_on_sigterm,
    no_interrupts,
    write_config,
)

# Paths a generative config may hold besides the encoders' (tuned.properties lives elsewhere).
GENERATIVE_PATH_KEYS = ("serve.api_key_file", "bench.tokenizer", "generate.engine_python")

FIRST_TRIAL_ESTIMATE_S = 120.0  # before any trial ran: a deploy and a short sweep
REPORT_RESERVE_S = 10.0


@dataclass(frozen=True)
class GenCandidate:
    cores_per_copy: int
    copies: int
    max_num_seqs: int
    max_model_len: int

    @property
    def label(self) -> str:
        return (
            f"{self.copies} cop{'y' if self.copies == 1 else 'ies'} x {self.cores_per_copy} core(s), "
            f"max_num_seqs {self.max_num_seqs}, max_model_len {self.max_model_len}"
        )

    def overrides(self) -> dict[str, str]:
        return {
            "deploy.cores_per_server": str(self.cores_per_copy),
            "deploy.servers": "max",
            "generate.max_num_seqs": str(self.max_num_seqs),
            "generate.max_model_len": str(self.max_model_len),
        }


@dataclass
class GenTrial:
    candidate: GenCandidate
    score: float = 0.0  # output tokens/s (or goodput) of the best step inside the budgets; 0: none
    output_tokens_per_s: float = 0.0
    level: float | None = None
    ttft_p95_ms: float = math.nan
    tpot_p95_ms: float = math.nan
    error_rate: float = 0.0
    ready_s: float = 0.0
    wall_s: float = 0.0
    failure: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)


def candidates(
    settings: Settings, total: int, heads: int, max_num_seqs: tuple[int, ...]
) -> list[GenCandidate]:
    """Every layout (cores per copy dividing ``total``; on Neuron also the heads) x each
    max_num_seqs, at the configured max_model_len (shortened later when its KV cache does not fit)."""
    from neuronserve.backends import choose_backend

    backend = choose_backend(settings.trace.backend)[0]
    out = []
    for per_copy in range(1, total + 1):
        if total % per_copy or (backend.neuron_cores and heads % per_copy):
            continue
        for seqs in max_num_seqs:
            out.append(GenCandidate(per_copy, total // per_copy, seqs, settings.generate.max_model_len))
    return out


def tune_generative(
    options: TuneOptions, emit: Callable[[str], None] = print, max_num_seqs: tuple[int, ...] = ()
) -> int:
    """Run the whole tune; returns 0 when a candidate served the workload within the budgets."""
    tuner = GenTuner(options, emit, max_num_seqs)
    interrupted = False
    try:
        with interrupt_on_sigterm():
            tuner.run()
    except KeyboardInterrupt:  # the trial in progress stopped its deployment
        interrupted = True
        emit("tune: interrupted; writing the report of the trials so far")
    trials = tuner.trials
    winner = max((t for t in trials if t.score > 0), key=lambda t: t.score, default=None)
    with no_interrupts(reraise=False):  # a second Ctrl-C does not cut the report short
        report = _write(tuner, trials, winner)
    emit(f"tune: report {report}")
    if interrupted:
        return EXIT_INTERRUPTED
    if winner is None:
        emit("tune: no candidate served the workload within the budgets")
        return 1
    what = "goodput req/s" if tuner.slo.given else "output tokens/s"
    emit(f"tune: best {winner.candidate.label}: {winner.score:.1f} {what}")
    emit(f"tune: deploy it with ./fast-api/deploy.sh --config {tuner.out / 'tuned.properties'}")
    return 0


class GenTuner:
    """The search's fixed parts (settings, workload, budgets) and its trials."""

    def __init__(
        self, options: TuneOptions, emit: Callable[[str], None], max_num_seqs: tuple[int, ...]
    ) -> None:
        from neuronserve.generate.launch import plan_for, trace
        from neuronserve.loadgen.genrun import _prompts, parse_extra_body, parse_slo, tokenizer_for
        from neuronserve.loadgen.genstats import GenBudgets
        from neuronserve.loadgen.stats import Pricing

        self.options, self.emit = options, emit
        base = load_settings(options.config, overrides=list(options.overrides))
        if base.deploy.launcher != "local":
            raise ConfigError("neuronserve tune deploys its candidates locally: use deploy.launcher=local")
        self.base = base
        b = base.bench
        self.stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.out = base.path(b.output_dir) / f"tune-{self.stamp}"
        self.out.mkdir(parents=True)
        self.started = time.monotonic()
        self.deadline = self.started + options.time_budget_s - REPORT_RESERVE_S
        emit(f"tune: results in {self.out}; time budget {options.time_budget_s:.0f} s")
        emit("tune: preparing the model (cached when unchanged)")
        trace(base, force=False, say=lambda _line: None)
        plan, self.manifest = plan_for(base, verify=False)
        self.total = len(plan.layout.servers) * len(plan.layout.servers[0].cores)
        self.slo = parse_slo(b.goodput)
        self.budgets = GenBudgets(b.ttft_budget_ms, b.tpot_budget_ms, b.error_budget)
        pricing = Pricing.load(base.path(b.pricing_file) if b.pricing_file else None)
        self.dollars = pricing.per_hour(b.instance_type, b.instance_count)
        self.tokens = tokenizer_for(base)
        self.prompts, self.workload = _prompts(base, self.tokens, None)
        self.extra = parse_extra_body(b.extra_body)
        # the longest sequence the workload makes (a chat template adds some 30 tokens)
        self.workload_len = max(p.tokens for p in self.prompts) + max(p.output_len for p in self.prompts) + 64
        self.levels = tuple(float(x) for x in (b.concurrency if b.mode == "closed" else b.rates))
        self.trials: list[GenTrial] = []
        self.space = candidates(
            base, self.total, self.manifest.facts.heads, max_num_seqs or (base.generate.max_num_seqs,)
        )
        emit(f"tune: {len(self.space)} candidates on {self.total} cores; workload: {self.workload}")

    def run(self) -> list[GenTrial]:
        trials = self.trials
        for index, candidate in enumerate(self.space):
            estimate = max((t.wall_s for t in trials), default=FIRST_TRIAL_ESTIMATE_S)
            if time.monotonic() + estimate > self.deadline:
                trials.append(
                    GenTrial(candidate, failure=f"skipped: its ~{estimate:.0f} s did not fit the time budget")
                )
                self.emit(f"  {candidate.label}: skipped (time budget)")
                continue
            trial = self.trial(candidate, index)
            trials.append(trial)
            b = self.base.bench
            verdict = trial.failure or (
                f"{trial.output_tokens_per_s:.1f} output tokens/s at {b.mode} {trial.level:g} "
                f"(p95 TTFT {trial.ttft_p95_ms:.0f} ms, TPOT {trial.tpot_p95_ms:.1f} ms)"
                + ("" if trial.score else "; no step within the budgets")
            )
            self.emit(f"  {trial.candidate.label}: {verdict} [{trial.wall_s:.0f} s]")
        return trials

    def trial(self, candidate: GenCandidate, index: int) -> GenTrial:
        """Deploy, load, tear down; nothing of the trial is left when it returns."""
        from neuronserve.deploy.local import free_ports, run_dir, stop
        from neuronserve.generate.launch import deploy

        trial = GenTrial(candidate)
        began = time.monotonic()
        settings: Settings | None = None
        try:
            overrides, trial.candidate = _fitting(self.options, candidate, self.workload_len, index, self.out)
            port = free_ports(trial.candidate.copies + 1)
            # A trial that cannot get ready within what is left of the budget is a failed trial.
            remaining = max(10.0, min(self.base.generate.ready_timeout_s, self.deadline - time.monotonic()))
            settings = load_settings(
                self.options.config,
                overrides=[
                    *overrides,
                    f"deploy.port={port}",
                    f"deploy.base_port={port + 1}",
                    f"generate.ready_timeout_s={remaining:.0f}",
                ],
            )
            ready_started = time.monotonic()
            said = io.StringIO()
            with contextlib.redirect_stdout(said):  # its plan and progress: the report says what matters
                deploy(settings, dry_run=False)
            trial.ready_s = time.monotonic() - ready_started
            self._measure(trial, settings)
        except (ConfigError, MemoryPlanError) as exc:
            trial.failure = f"not deployable: {str(exc).splitlines()[0]}"
        except Exception as exc:  # a failed trial is a result; the search goes on
            trial.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            if settings is not None:
                with no_interrupts():  # by name: stopping one that never started is a no-op
                    stop(run_dir(settings))
            trial.wall_s = time.monotonic() - began
        return trial

    def _measure(self, trial: GenTrial, settings: Settings) -> None:
        from neuronserve.loadgen.genload import StreamPlan, warm_up
        from neuronserve.loadgen.genrun import Sweep, local_engine_metrics
        from neuronserve.loadgen.genstats import decide

        b = self.base.bench
        template = StreamPlan(
            b.api or "openai-chat", self.manifest.name, b.mode, 0.0, b.num_prompts, b.timeout_s, b.ignore_eos,
            b.seed, self.extra,
        )  # fmt: skip
        key = settings.api_key()
        headers = auth_headers(key)
        url = f"http://127.0.0.1:{settings.deploy.port}"
        metrics = local_engine_metrics(settings)
        first = warm_up(dataclasses.replace(template, level=1, num_prompts=1), url, self.prompts[-1], headers)
        if first.error:
            raise RuntimeError(f"the first request failed ({first.error}: {first.detail})")
        sweep = Sweep(template, self.levels, url, headers, metrics, self.slo, self.budgets, self.dollars)
        steps, _rows = sweep.run(self.prompts, self.tokens, progress=False)
        decision = decide(steps, self.budgets, by_goodput=self.slo.given)
        best = steps[decision["best"]] if decision["best"] is not None else steps[0]
        if decision["best"] is not None:
            trial.score = (best.goodput_per_s or 0.0) if self.slo.given else best.output_tokens_per_s
        trial.output_tokens_per_s = best.output_tokens_per_s
        trial.level = best.level
        trial.ttft_p95_ms, trial.tpot_p95_ms = best.ttft_ms["p95"], best.tpot_ms["p95"]
        trial.error_rate = best.error_rate
        trial.steps = [
            {"level": s.level, "output_tokens_per_s": s.output_tokens_per_s, "ttft_p95_ms": _finite(s.ttft_ms["p95"]),
             "tpot_p95_ms": _finite(s.tpot_ms["p95"]), "error_rate": s.error_rate}
            for s in steps
        ]  # fmt: skip


def _fitting(
    options: TuneOptions,
    candidate: GenCandidate,
    workload_len: int,
    index: int,
    out: Path,
    *,
    host_memory: int | None = None,
) -> tuple[list[str], GenCandidate]:
    """The candidate's settings (overrides of the config), its max_model_len shortened to the
    workload's when its KV cache does not fit at the configured one; MemoryPlanError when it does
    not fit even so."""
    from neuronserve.generate.launch import plan_for

    lengths = dict.fromkeys((candidate.max_model_len, min(candidate.max_model_len, workload_len)))
    for length in lengths:
        tried = dataclasses.replace(candidate, max_model_len=length)
        overrides = [
            *options.overrides,
            *(f"{k}={v}" for k, v in tried.overrides().items()),
            f"deploy.name=tune-{os.getpid()}-{index}",
            f"deploy.run_dir={out / 'run'}",
            "monitor.enabled=false",
            "monitor.prometheus=false",
        ]
        settings = load_settings(
            options.config, overrides=[*overrides, "deploy.port=1", "deploy.base_port=2"]
        )
        plan, _manifest = plan_for(settings, verify=False, host_memory=host_memory)
        try:
            plan.check()
        except MemoryPlanError:
            if length == list(lengths)[-1]:
                raise
            continue
        return overrides, tried
    raise AssertionError("this is a bug: no length was tried")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _write(tuner: GenTuner, trials: list[GenTrial], winner: GenTrial | None) -> Path:
    base, options, out, stamp = tuner.base, tuner.options, tuner.out, tuner.stamp
    workload, elapsed_s = tuner.workload, time.monotonic() - tuner.started
    b = base.bench
    summary = {
        "kind": "generative",
        "started_at": stamp,
        "elapsed_s": elapsed_s,
        "time_budget_s": options.time_budget_s,
        "workload": workload,
        "levels": list(b.concurrency if b.mode == "closed" else b.rates),
        "budgets": {
            "ttft_p95_ms": b.ttft_budget_ms,
            "tpot_p95_ms": b.tpot_budget_ms,
            "error_rate": b.error_budget,
        },
        "trials": [
            {
                **dataclasses.asdict(t),
                "label": t.candidate.label,
                "ttft_p95_ms": _finite(t.ttft_p95_ms),
                "tpot_p95_ms": _finite(t.tpot_p95_ms),
            }
            for t in trials
        ],
        "best": winner.candidate.label if winner else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# Tune {stamp}: {base.model_name}",
        "",
        f"**Best:** {winner.candidate.label}: {winner.output_tokens_per_s:.1f} output tokens/s at {b.mode} {winner.level:g}"
        if winner
        else "**Best:** none: no candidate served the workload within the budgets",
        "",
        f"Workload: {workload}; {b.num_prompts} requests per step, {b.mode} loop over {summary['levels']}; budgets "
        f"p95 TTFT {b.ttft_budget_ms or 'none'} ms, p95 TPOT {b.tpot_budget_ms or 'none'} ms, errors "
        f"{b.error_budget:.1%}; {elapsed_s:.0f} s of a {options.time_budget_s:.0f} s budget.",
        "",
        "| candidate | output tok/s (best step in budget) | at | p95 TTFT ms | p95 TPOT ms | errors | ready s | trial s | |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        mark = "best" if t is winner else (t.failure or ("" if t.score else "no step within the budgets"))
        at = "-" if t.level is None else f"{t.level:g}"
        lines.append(
            f"| {t.candidate.label} | {t.output_tokens_per_s:.1f} | {at} | {_f(t.ttft_p95_ms, 0)} | "
            f"{_f(t.tpot_p95_ms)} | {t.error_rate:.1%} | {t.ready_s:.0f} | {t.wall_s:.0f} | {mark} |"
        )
    if winner is not None:
        path = write_tuned(out / "tuned.properties", options, winner, stamp)
        lines += ["", f"tuned.properties: `./fast-api/deploy.sh --config {path}`"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _f(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def write_tuned(path: Path, options: TuneOptions, winner: GenTrial, stamp: str) -> Path:
    """A complete config: the original settings with the winner's, every path absolute."""
    extra = [f"{k}={v}" for k, v in winner.candidate.overrides().items()]
    settings = load_settings(options.config, overrides=[*options.overrides, *extra])
    absolute = absolute_paths(settings, (*PATH_KEYS, *GENERATIVE_PATH_KEYS))
    source = settings.path(settings.model.source)
    if not settings.model.source.startswith("bundled:") and source.exists():
        absolute.append(f"model.source={source.resolve()}")
    settings = load_settings(options.config, overrides=[*options.overrides, *extra, *absolute])
    header = [
        f"# Written by neuronserve tune {stamp}: {winner.candidate.label}",
        f"# {winner.output_tokens_per_s:.1f} output tokens/s within the budgets on its workload",
        f"# Use it as it is: ./trace-model/run.sh --config {path} && ./fast-api/deploy.sh --config {path}",
    ]
    return write_config(path, settings, header)
