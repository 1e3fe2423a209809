"""``neuronserve tune``: shapes from the traffic, then a deployment search within the budgets.

1. The configured grid is traced (cached); its per-shape costs and the sample's token lengths
   choose the sequence buckets and batch sizes with the least expected padded compute, within
   the shape budget (as many of each as the configured grid has, unless told otherwise).
2. That grid is traced once into its own directory (cached across runs); every candidate
   serves it.
3. Candidates (cores per server, copies, largest batch, batch delay) are searched by successive
   halving. Each trial deploys on free ports, runs a closed-loop sweep that stops at the first
   load breaking a budget, keeps the best throughput within every budget, and tears down before
   the next starts. A candidate the memory plan refuses is recorded, never started.
4. ``results/tune-<stamp>/``: report.md, pareto.png, summary.json and tuned.properties (a
   complete config: ``--config tuned.properties`` uses it as it is).

Ctrl-C (or SIGTERM) ends the search: the deployment in progress is stopped, and the report of
what ran so far is written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuronserve.artifacts import Manifest
from neuronserve.config import ConfigError, Settings, find_config, load_settings, render_template
from neuronserve.loadgen.http import auth_headers
from neuronserve.tune import buckets
from neuronserve.tune.report import Grid, Outcome, csv, write_report
from neuronserve.tune.search import (
    FIRST_DURATION_S,
    LONGEST_DURATION_S,
    Candidate,
    SearchResult,
    Trial,
    successive_halving,
)

# Closed-loop concurrency levels; a sweep stops at the first level over a budget. The first rung
# screens on a coarse ladder; later rungs measure the survivors on a fine one.
SCREEN_LEVELS = (4, 8, 16, 32)
LEVELS = (4, 8, 12, 16, 24, 32, 48, 64)
WARMUP_S = 0.5
REPORT_RESERVE_S = 15.0  # kept from the time budget for the last teardown and the report
DELAYS_MS = (2.0, 10.0)
EXIT_INTERRUPTED = 130
# Keys holding paths: tuned.properties lives elsewhere than the config, so they are written absolute.
PATH_KEYS = (
    "trace.output_dir",
    "serve.artifacts",
    "deploy.run_dir",
    "bench.output_dir",
    "bench.dataset",
    "bench.pricing_file",
    "monitor.replay_file",
)


@dataclass(frozen=True)
class TuneOptions:
    config: str | None  # --config as given
    overrides: tuple[str, ...]  # --set as given
    dataset: str = ""  # empty: bench.dataset, else the built-in sample texts
    time_budget_s: float = 900.0
    max_sequence_lengths: int = 0  # 0: as many as the configured grid has
    max_batch_sizes: int = 0


def tune(options: TuneOptions, emit: Callable[[str], None] = print) -> int:
    """Run the whole tune; returns the exit status (130 when interrupted)."""
    from neuronserve.loadgen.payloads import load_texts

    settings = _load(options)
    if settings.deploy.launcher != "local":
        raise ConfigError("neuronserve tune deploys its candidates locally: use deploy.launcher=local")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = settings.path(settings.bench.output_dir) / f"tune-{stamp}"
    out.mkdir(parents=True)
    b = settings.bench
    dataset = options.dataset or (str(settings.path(b.dataset)) if b.dataset else "")
    outcome = Outcome(
        directory=out,
        started_at=stamp,
        time_budget_s=options.time_budget_s,
        budgets={
            "latency_p95_ms": b.latency_budget_ms,
            "error_rate": b.error_budget,
            "cost_per_million": b.cost_budget,
        },
        instance_type=b.instance_type,
        dataset=dataset or "built-in sample texts",
    )
    started = time.monotonic()
    emit(f"tune: results in {out}; time budget {options.time_budget_s:.0f} s")
    try:
        with interrupt_on_sigterm():
            texts = load_texts(dataset, b.text_field)
            _search(options, settings=settings, texts=texts, outcome=outcome, started=started, emit=emit)
    except KeyboardInterrupt:
        outcome.interrupted = True
        emit("tune: interrupted; the deployment in progress was stopped, writing the report so far")
    except Exception as exc:  # reported, then raised for the CLI's one-line error
        outcome.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        outcome.elapsed_s = time.monotonic() - started
        with no_interrupts(reraise=False):  # a second Ctrl-C does not cut the report short
            report = _finish(outcome, options)
        emit(f"tune: report {report}")
    if outcome.interrupted:
        return EXIT_INTERRUPTED
    best = outcome.search.best if outcome.search else None
    return 0 if best is not None and best.rps > 0 else 1


def _load(options: TuneOptions, *extra: str) -> Settings:
    settings = load_settings(options.config, overrides=[*options.overrides, *extra])
    if settings.extra_models:
        names = ", ".join(m.name for m in settings.extra_models)
        raise ConfigError(
            f"tune measures one model: this config also serves {names} (models.<name>.*); tune each "
            "model with a config of its own (model.* only), then copy the chosen grid and copies back"
        )
    return settings


def _search(
    options: TuneOptions,
    *,
    settings: Settings,
    texts: list[str],
    outcome: Outcome,
    started: float,
    emit: Callable[[str], None],
) -> None:
    from neuronserve.loadgen.payloads import TokenCounter
    from neuronserve.trace import run_trace

    emit("tune: tracing the configured grid (cached when unchanged)")
    configured = run_trace(settings, progress=False, emit=lambda _line: None)
    manifest = configured.manifest
    outcome.model = str(manifest.model.get("name", ""))
    outcome.backend = manifest.backend.value
    counter = TokenCounter(configured.directory)
    lengths = [counter.count(t) for t in texts]
    outcome.lengths = sorted(lengths)
    outcome.configured, outcome.tuned = choose_grid(manifest, outcome.lengths, options)
    fits = max(outcome.tuned.sequence_lengths)
    kept = [t for t, n in zip(texts, lengths, strict=True) if n <= fits]
    outcome.excluded = len(texts) - len(kept)
    if outcome.excluded:
        emit(
            f"tune: {outcome.excluded} of {len(texts)} texts exceed {fits} tokens (the model's limit) and are "
            "left out of the load; served, they are refused unless the request truncates"
        )
    if not kept:
        raise ConfigError(f"no text of the sample fits the model's {fits} tokens")
    texts = kept
    emit(
        f"tune: shapes from traffic: sequence lengths {csv(outcome.tuned.sequence_lengths)} "
        f"(configured {csv(outcome.configured.sequence_lengths)}), batch sizes "
        f"{csv(outcome.tuned.batch_sizes)}; expected compute per text "
        f"{outcome.tuned.expected_cost / outcome.configured.expected_cost:.2f}x the configured grid's"
    )
    tuned_dir = settings.path(settings.trace.output_dir) / "tuned"
    grid = _grid_overrides(outcome.tuned, tuned_dir)
    tuned_settings = _load(options, *grid)
    emit("tune: tracing the tuned grid (cached when unchanged)")
    traced = run_trace(tuned_settings, progress=False, emit=lambda _line: None)
    candidates = candidate_space(tuned_settings, traced.manifest)
    outcome.candidates = len(candidates)
    remaining = options.time_budget_s - (time.monotonic() - started) - REPORT_RESERVE_S
    evaluate = TrialRunner(
        options,
        grid=grid,
        artifacts=traced.directory,
        texts=texts,
        counter=counter,
        deadline=time.monotonic() + remaining,
    )
    emit(f"tune: {len(candidates)} candidates, successive halving in {max(0.0, remaining):.0f} s")

    def progress(trial: Trial, result: SearchResult) -> None:
        outcome.search = result
        used = time.monotonic() - started
        verdict = trial.failure or (
            f"{trial.rps:.1f} req/s within budget at concurrency {trial.level:g} (p95 {trial.p95_ms:.0f} ms)"
            if trial.rps > 0
            else f"no load within budget (p95 {trial.p95_ms:.0f} ms at the lowest)"
        )
        emit(
            f"  rung {trial.rung + 1} | {trial.candidate.label}: {verdict} "
            f"[{trial.wall_s:.0f} s; {used:.0f}/{options.time_budget_s:.0f} s used]"
        )

    outcome.search = SearchResult(trials=[], rungs=0)
    outcome.search = successive_halving(
        candidates,
        evaluate,
        time_budget_s=remaining,
        first_duration_s=FIRST_DURATION_S,
        longest_duration_s=LONGEST_DURATION_S,
        on_trial=progress,
    )
    if outcome.search.interrupted:
        raise KeyboardInterrupt


def choose_grid(manifest: Manifest, lengths: Sequence[int], options: TuneOptions) -> tuple[Grid, Grid]:
    """The configured grid and the grid chosen for ``lengths``, each with its expected cost."""
    costs = {(e.batch_size, e.sequence_length): e.cost_s for e in manifest.shapes}
    b_max = max(manifest.batch_sizes)
    largest = tuned_largest(manifest, lengths)
    per_text = buckets.interpolate({s: c / b_max for (b, s), c in costs.items() if b == b_max})
    clipped = [min(n, largest) for n in lengths]  # longer ones cannot be served at all
    k_seq = options.max_sequence_lengths or len(manifest.sequence_lengths)
    k_batch = options.max_batch_sizes or len(manifest.batch_sizes)
    seqs = buckets.sequence_buckets(clipped, per_text, max_buckets=k_seq, largest=largest)
    # Batch sizes are chosen at the sequence length most of the sample's compute runs at.
    counts: dict[int, int] = {}
    for n in clipped:
        bucket = min(s for s in seqs if s >= n)
        counts[bucket] = counts.get(bucket, 0) + 1
    heaviest = max(counts, key=lambda s: counts[s] * per_text(s))
    nearest = min(manifest.sequence_lengths, key=lambda s: abs(s - heaviest))
    per_call = buckets.interpolate({b: c for (b, s), c in costs.items() if s == nearest})
    sizes = buckets.batch_sizes(per_call, max_sizes=k_batch, largest=b_max)
    sample = Counter(clipped)

    def expected(seq: Sequence[int]) -> float:  # per text
        return buckets.expected_cost(sample, seq, per_text) / len(clipped) if clipped else 0.0

    configured = Grid(manifest.batch_sizes, manifest.sequence_lengths, expected(manifest.sequence_lengths))
    return configured, Grid(sizes, seqs, expected(seqs))


def tuned_largest(manifest: Manifest, lengths: Sequence[int]) -> int:
    """The largest sequence length to compile: the configured one, raised to hold the sample's
    longest text (a multiple of 8) as far as the model's positions allow."""
    configured = max(manifest.sequence_lengths)
    positions = int(manifest.model.get("max_position_embeddings") or configured)
    limit = max(configured, positions - positions % 8)
    need = -(-max(lengths) // 8) * 8 if lengths else configured
    return max(configured, min(need, limit))


def candidate_space(settings: Settings, manifest: Manifest) -> list[Candidate]:
    """Cores per server from one per core to one server owning all; copies; largest batch; delay."""
    from neuronserve.deploy.inventory import detect
    from neuronserve.deploy.plan import chosen_cores

    cores = len(chosen_cores(settings, detect(manifest.backend)))
    per_server = [n for n in range(1, cores + 1) if cores % n == 0]

    def copies(cps: int) -> list[int]:
        default = manifest.backend.copies_per_server(0, cps)
        return sorted({1, default, 2 * default} if manifest.backend.neuron_cores else {1, 2, default})

    sizes = manifest.batch_sizes
    # A small cap (latency: a long batch never holds up what queues behind it) and none.
    batches = sorted({next((b for b in sizes if b >= 8), sizes[-1]), sizes[-1]})
    space = [
        Candidate(cps, c, mb, delay)
        for cps in per_server
        for c in copies(cps)
        for mb in batches
        for delay in DELAYS_MS
    ]
    # A fixed shuffle: if the time budget cuts the first rung short, what ran still spans every
    # layout instead of only the first cores-per-server values.
    random.Random(0).shuffle(space)  # noqa: S311 - an order, not a secret
    return space


def _grid_overrides(grid: Grid, tuned_dir: Path) -> list[str]:
    return [
        f"trace.batch_sizes={csv(grid.batch_sizes)}",
        f"trace.sequence_lengths={csv(grid.sequence_lengths)}",
        f"trace.output_dir={tuned_dir}",
    ]


class TrialRunner:
    """``evaluate(candidate, rung, duration_s)`` for the search: plan, deploy on free ports, sweep,
    tear down. Nothing of one trial is left when it returns (or raises)."""

    def __init__(
        self,
        options: TuneOptions,
        *,
        grid: list[str],
        artifacts: Path,
        texts: list[str],
        counter: Any,
        deadline: float,
    ) -> None:
        from neuronserve.loadgen.payloads import build_payloads
        from neuronserve.loadgen.stats import Budgets, Pricing

        self.options, self.grid, self.artifacts, self.deadline = options, grid, artifacts, deadline
        base = _load(options)
        self.base = base
        b = base.bench
        self.budgets = Budgets(b.latency_budget_ms, b.error_budget, b.cost_budget)
        pricing = Pricing.load(base.path(b.pricing_file) if b.pricing_file else None)
        self.dollars = pricing.per_hour(b.instance_type, b.instance_count)
        self.route = b.route if b.route != "v2" else "/predict"
        self.payloads = build_payloads(texts, self.route, counter)
        key = base.api_key()
        self.headers = auth_headers(key)
        self.config = find_config(options.config, {})

    def __call__(self, candidate: Candidate, rung: int, duration_s: float) -> Trial:
        from neuronserve.deploy.commands import plan_for
        from neuronserve.deploy.local import DeployError, free_ports

        trial = Trial(candidate, rung, duration_s, rps=0.0)
        remaining = self.deadline - time.monotonic()
        chosen = [
            *self.grid,
            *(f"{k}={v}" for k, v in candidate.overrides().items()),
            f"serve.artifacts={self.artifacts}",
            # Its own name (two tunes never stop each other's trials) and nothing but the servers.
            f"deploy.name={self.base.deploy.name}-tune-{os.getpid()}",
            "monitor.enabled=false",
            "monitor.prometheus=false",
            # A trial that cannot get ready within what is left of the budget is a failed trial.
            f"deploy.ready_timeout_s={max(10.0, min(self.base.deploy.ready_timeout_s, remaining)):.0f}",
        ]
        try:
            # Placeholder ports to count the servers, then one free range: the endpoint, the servers.
            counted = _load(self.options, *chosen, "deploy.port=1", "deploy.base_port=2")
            servers = len(plan_for(counted, verify=False)[0].servers)
            port = free_ports(servers + 1)
            settings = _load(self.options, *chosen, f"deploy.port={port}", f"deploy.base_port={port + 1}")
            plan, _manifest, memory = plan_for(settings, verify=False)
        except (ConfigError, DeployError) as exc:
            trial.failure = f"not deployable: {exc}"
            return trial
        trial.memory_bytes = memory.host_total
        problem = memory.host_problem() or next(iter(memory.device_problems()), None)
        if problem:
            trial.failure = f"memory plan refused: {problem}"
            return trial
        self._load_test(trial, settings, plan)
        return trial

    def _load_test(self, trial: Trial, settings: Settings, plan: Any) -> None:
        from neuronserve.deploy import local
        from neuronserve.loadgen.client import Sweep, run_sweep
        from neuronserve.loadgen.http import Target
        from neuronserve.loadgen.stats import decide

        started = time.monotonic()
        try:
            rd = local.start(settings, plan, self.artifacts, self.config)
            local.wait_ready(settings, plan, rd)
            levels = tuple(float(x) for x in (SCREEN_LEVELS if trial.rung == 0 else LEVELS))
            sweep = Sweep(
                "closed",
                levels,
                trial.duration_s,
                WARMUP_S,
                0,
                self.base.bench.timeout_s,
                1,
                self.budgets,
                self.dollars,
            )
            target = Target.parse(f"http://{settings.deploy.host}:{settings.deploy.port}", self.route)
            steps, _rows = run_sweep(sweep, [target], self.payloads, self.headers, progress=False)
        except local.DeployError as exc:
            trial.failure = f"deploy failed: {str(exc).splitlines()[0]}"
            return
        finally:
            # By name, not by what start returned: an interrupt inside start may come after
            # supervisord is up. Stopping a deployment that never started is a no-op.
            with no_interrupts():
                local.stop(local.run_dir(settings))
            trial.wall_s = time.monotonic() - started
        decision = decide(steps, self.budgets)
        reported = steps[decision["best"]] if decision["best"] is not None else steps[0]
        if decision["best"] is not None:
            trial.rps = reported.rps
        trial.level = reported.level
        trial.p50_ms, trial.p95_ms, trial.p99_ms = (reported.latency_ms[k] for k in ("p50", "p95", "p99"))
        trial.error_rate = reported.error_rate
        trial.cost_per_million = reported.cost_per_million
        trial.steps = [
            {
                "level": s.level,
                "rps": s.rps,
                "p95_ms": _finite(s.latency_ms["p95"]),
                "error_rate": s.error_rate,
            }
            for s in steps
        ]


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM ends the tune like Ctrl-C (cleanup and a report), in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def no_interrupts(*, reraise: bool = True) -> Iterator[None]:
    """Cleanup and the report are not cut short by Ctrl-C or SIGTERM: one that arrives meanwhile
    is raised afterwards as KeyboardInterrupt (``reraise``), or dropped when the tune is ending."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, _f: pending.append(signum))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending and reraise:
            raise KeyboardInterrupt


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def write_tuned_properties(path: Path, outcome: Outcome, best: Trial, options: TuneOptions) -> Path:
    """A complete config: the original settings, the tuned grid and the winner's settings, with
    every path absolute (the file lives apart from the config it came from)."""
    assert outcome.tuned is not None
    base = _load(options)
    tuned_dir = base.path(base.trace.output_dir) / "tuned"
    extra = [
        *_grid_overrides(outcome.tuned, tuned_dir),
        *(f"{k}={v}" for k, v in best.candidate.overrides().items()),
        "serve.artifacts=",  # served from trace.output_dir: the tuned grid, not a configured path
    ]
    settings = _load(options, *extra)
    absolute = absolute_paths(settings, PATH_KEYS)
    source = Path(settings.model.source)
    if source.exists():
        absolute.append(f"model.source={source.resolve()}")
    settings = _load(options, *extra, *absolute)
    c = best.candidate
    header = [
        f"# Written by neuronserve tune {outcome.started_at}: {c.label}",
        f"# {best.rps:.1f} req/s within p95 <= {outcome.budgets['latency_p95_ms']:g} ms on its traffic "
        f"({outcome.dataset}); report: {outcome.directory / 'report.md'}",
        f"# Use it as it is: ./trace-model/run.sh --config {path} && ./fast-api/deploy.sh --config {path}",
    ]
    return write_config(path, settings, header)


def absolute_paths(settings: Settings, keys: Sequence[str]) -> list[str]:
    """``key=<absolute path>`` for each of ``keys`` that is set: a config written elsewhere than
    the one it came from means the same files."""
    absolute = []
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(settings, section), name)
        if value:
            absolute.append(f"{key}={settings.path(value)}")
    return absolute


def write_config(path: Path, settings: Settings, header: list[str]) -> Path:
    """``settings`` as a complete config at ``path`` (its owner's alone when it holds the API
    key), read back to prove it valid."""
    text = render_template(settings, header)
    mode = (
        0o600 if settings.serve.api_key or settings.serve.api_key_file else 0o644
    )  # with the API key in it: never readable by others
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w", encoding="utf-8") as fh:
        fh.write(text)
    load_settings(str(path))  # it must read back as a valid config
    return path


def _finish(outcome: Outcome, options: TuneOptions) -> Path:
    """tuned.properties for the winner (guarded: whatever fails there, the report is written),
    then the report."""
    search = outcome.search
    best = search.best if search else None
    if best is not None and best.rps > 0 and outcome.tuned is not None:
        try:
            outcome.tuned_properties = write_tuned_properties(
                outcome.directory / "tuned.properties", outcome, best, options
            )
        except Exception as exc:
            outcome.error = (outcome.error + "; " if outcome.error else "") + f"tuned.properties: {exc}"
    return write_report(outcome)
