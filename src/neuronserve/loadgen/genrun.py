"""``neuronserve bench --api openai-chat|openai-completions``: a sweep of streamed requests against
an OpenAI-compatible generative endpoint (ours, vLLM's, TGI's, a hosted one with a key), with the
engines' own metrics beside the client's, and a report."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuronserve import __version__
from neuronserve.config import ConfigError, Settings
from neuronserve.loadgen import engine_metrics
from neuronserve.loadgen.genload import (
    Prompt,
    StreamPlan,
    Tokens,
    file_prompts,
    random_prompts,
    run_stream_step,
    served_model,
    warm_up,
)
from neuronserve.loadgen.genreport import steps_table, write_all
from neuronserve.loadgen.genstats import GenBudgets, GenStep, Slo, decide, knee, summarize, violations
from neuronserve.loadgen.http import auth_headers
from neuronserve.loadgen.payloads import Bucket, PayloadError, parse_buckets
from neuronserve.loadgen.sse import Api, StreamRecord
from neuronserve.loadgen.stats import Pricing


def parse_slo(text: str) -> Slo:
    """``ttft:2000,tpot:100,e2el:10000`` (milliseconds; any subset)."""
    values: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, number = part.partition(":")
        if not sep or key not in {"ttft", "tpot", "e2el"}:
            raise ConfigError(
                f"bench.goodput {part!r}: use ttft:MS, tpot:MS and/or e2el:MS, e.g. ttft:2000,tpot:100"
            )
        try:
            values[f"{key}_ms"] = float(number)
        except ValueError:
            raise ConfigError(f"bench.goodput {part!r}: {number!r} is not a number of milliseconds") from None
    return Slo(**values)


def parse_extra_body(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f'bench.extra_body is not JSON ({exc}); e.g. {{"temperature": 0}}') from None
    if not isinstance(value, dict):
        raise ConfigError('bench.extra_body must be a JSON object, e.g. {"temperature": 0}')
    return value


def tokenizer_for(settings: Settings) -> Tokens | None:
    """bench.tokenizer, else the prepared model of this host's deployment, else None."""
    b = settings.bench
    if b.tokenizer:
        return Tokens(settings.path(b.tokenizer))
    if not settings.model.task.generates:
        return None
    from neuronserve.backends import choose_backend
    from neuronserve.generate.artifacts import (
        GenerationArtifactError,
        GenerationManifest,
        generation_directory,
    )

    try:
        manifest = GenerationManifest.read(
            generation_directory(settings, choose_backend(settings.trace.backend)[0])
        )
    except (GenerationArtifactError, OSError, ValueError):
        return None
    return Tokens(manifest.model_dir)


def local_engine_metrics(settings: Settings, url: str = "") -> list[str]:
    """bench.engine_metrics, else the /metrics of each copy of this host's local deployment when
    ``url`` is its endpoint (a run against another endpoint reads no local counters)."""
    if settings.bench.engine_metrics:
        return [u.strip() for u in settings.bench.engine_metrics.split(",") if u.strip()]
    from urllib.parse import urlsplit

    if url and urlsplit(url).port != settings.deploy.port:
        return []
    from neuronserve.deploy.local import run_dir, served_programs, supervisord_pid

    rd = run_dir(settings)
    if supervisord_pid(rd) is None:
        return []
    programs, engines = served_programs(rd.path)
    return [f"http://127.0.0.1:{p['port']}/metrics" for p in programs] if engines else []


def _prompts(settings: Settings, tokens: Tokens | None, bucket: Bucket | None) -> tuple[list[Prompt], str]:
    b = settings.bench
    if b.dataset:
        path = settings.path(b.dataset)
        prompts = file_prompts(path, b.text_field, b.output_len, tokens, bucket)
        return prompts, f"{len(prompts)} prompts from {path}" + (f" ({bucket.label})" if bucket else "")
    if tokens is None:
        raise PayloadError(
            "random prompts need the model's tokenizer: pass --tokenizer DIR (the model's directory), or "
            "--dataset FILE of prompts"
        )
    # Prompts of their own for every step and for the warm-up (the last): a step never meets a
    # prompt a cache of prefixes already holds.
    levels = b.concurrency if b.mode == "closed" else b.rates
    count = b.num_prompts * len(levels) + 1
    prompts = random_prompts(tokens, count, b.input_len, b.output_len, b.seed)
    return prompts, f"random prompts of {b.input_len} tokens asking for {b.output_len}, seed {b.seed}"


@dataclass(frozen=True)
class Sweep:
    """One step per level, each sending prompts of its own (step i: from i x num_prompts on);
    the engines' metrics read around each."""

    template: StreamPlan  # every step's plan but its level and seed
    levels: tuple[float, ...]
    url: str
    headers: dict[str, str]
    metrics_urls: list[str]
    slo: Slo
    budgets: GenBudgets
    dollars_per_hour: float | None

    def run(
        self, prompts: list[Prompt], tokens: Tokens | None, *, progress: bool
    ) -> tuple[list[GenStep], list[tuple[int, StreamRecord]]]:
        """Every step until one breaks the TTFT or error budget (that one is kept and reported)."""
        steps: list[GenStep] = []
        rows: list[tuple[int, StreamRecord]] = []
        t = self.template
        unit = "concurrency" if t.mode == "closed" else "rate"
        for index, level in enumerate(self.levels):
            plan = dataclasses.replace(t, level=level, seed=t.seed + index)
            before = engine_metrics.scrape(self.metrics_urls) if self.metrics_urls else None
            offset = index * t.num_prompts
            records, duration = asyncio.run(
                run_stream_step(plan, self.url, prompts, self.headers, offset=offset)
            )
            for r in records:
                if r.ok and r.tokens_from != "usage":  # no usage from this server
                    if tokens is not None:
                        r.output_tokens, r.tokens_from = tokens.count(r.text), "tokenizer"
                    else:  # a chunk may carry several tokens: a lower bound, said in the report
                        r.output_tokens, r.tokens_from = r.chunks, "chunks"
            step = summarize(
                records,
                mode=t.mode,
                level=level,
                duration_s=duration,
                slo=self.slo,
                dollars_per_hour=self.dollars_per_hour,
            )
            if "chunks" in step.tokens_from:
                step.notes.append(
                    "the server sent no usage and no tokenizer was given (--tokenizer): output tokens are "
                    "counted as content chunks, a lower bound"
                )
            if before is not None:
                step.server = engine_metrics.summary(engine_metrics.scrape(self.metrics_urls).minus(before))
            steps.append(step)
            rows.extend((index, r) for r in records)
            if progress:
                print(
                    f"{unit} {level:g}: {step.output_tokens_per_s:.1f} output tokens/s, TTFT p50 "
                    f"{step.ttft_ms['p50']:.0f} ms, TPOT p50 {step.tpot_ms['p50']:.1f} ms, "
                    f"{step.completed}/{step.requests} completed",
                    flush=True,
                )
            broken = [v for v in violations(step, self.budgets) if "TPOT" not in v]
            if broken and index < len(self.levels) - 1:
                step.notes.append(f"sweep stopped here: {'; '.join(broken)}")
                break
        return steps, rows


def run_generative(settings: Settings, *, progress: bool) -> list[Path]:
    b = settings.bench
    api: Api = b.api  # type: ignore[assignment]  # not "" here
    targets = [u.strip() for u in b.target.split(",") if u.strip()]
    if len(targets) > 1:
        raise ConfigError(
            "generative runs load one endpoint: give --target one URL (the balancer in front of the copies)"
        )
    url = next(iter(targets), "") or (
        f"http://{'127.0.0.1' if settings.deploy.host in {'0.0.0.0', '::'} else settings.deploy.host}:"  # noqa: S104
        f"{settings.deploy.port}"
    )
    key = settings.api_key()
    headers = auth_headers(key)
    model = b.model or asyncio.run(served_model(url, headers))
    if not model:
        raise ConfigError(f"{url}/v1/models names no model: pass --model NAME")
    tokens = tokenizer_for(settings)
    slo = parse_slo(b.goodput)
    extra = parse_extra_body(b.extra_body)
    budgets = GenBudgets(b.ttft_budget_ms, b.tpot_budget_ms, b.error_budget)
    pricing = Pricing.load(settings.path(b.pricing_file) if b.pricing_file else None)
    dollars = pricing.per_hour(b.instance_type, b.instance_count)
    levels = tuple(float(x) for x in (b.concurrency if b.mode == "closed" else b.rates))
    metrics_urls = local_engine_metrics(settings, url)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    buckets: list[Bucket | None] = [*parse_buckets(b.token_buckets)] or [None]
    written = []
    for bucket in buckets:
        prompts, described = _prompts(settings, tokens, bucket)
        first = warm_up(
            StreamPlan(api, model, b.mode, 1, 1, b.timeout_s, b.ignore_eos, b.seed, extra),
            url,
            prompts[-1],
            headers,
        )
        if first.error:
            raise ConfigError(
                f"{url}: the first request failed ({first.error}: {first.detail}); check --target, --model and the key"
            )
        template = StreamPlan(
            api, model, b.mode, 0.0, b.num_prompts, b.timeout_s, b.ignore_eos, b.seed, extra
        )
        sweep = Sweep(template, levels, url, headers, metrics_urls, slo, budgets, dollars)
        steps, rows = sweep.run(prompts, tokens, progress=progress)
        knee_index = knee(steps, b.tpot_budget_ms)
        decision = decide(steps, budgets, by_goodput=slo.given)
        suffix = f"-{bucket.low}-{bucket.high}" if bucket else ""
        summary: dict[str, Any] = {
            "name": f"{b.name}{suffix}",
            "kind": "generative",
            "started_at": stamp,
            "config": {
                "targets": [url],
                "api": api,
                "model": model,
                "mode": b.mode,
                "levels": list(levels),
                "num_prompts": b.num_prompts,
                "prompts": described,
                "input_len": b.input_len if not b.dataset else None,
                "output_len": b.output_len,
                "ignore_eos": b.ignore_eos,
                "extra_body": extra,
                "timeout_s": b.timeout_s,
                "budgets": {
                    "ttft_p95_ms": b.ttft_budget_ms,
                    "tpot_p95_ms": b.tpot_budget_ms,
                    "error_rate": b.error_budget,
                },
                "slo": {k: v for k, v in vars(slo).items() if v} if slo.given else {},
                "engine_metrics": metrics_urls,
                "instance_type": b.instance_type,
                "instance_count": b.instance_count,
                "dollars_per_hour": dollars,
            },
            "environment": {
                "client host": platform.node(),
                "client CPUs": os.cpu_count(),
                "python": platform.python_version(),
                "neuronserve": __version__,
            },
            "pricing": {"source": pricing.source, "date": pricing.date},
            "knee": knee_index,
            "decision": decision,
        }
        directory = settings.path(b.output_dir) / f"{b.name}{suffix}-{stamp}"
        report = write_all(directory, summary, steps, rows)
        print(steps_table(steps, knee_index, decision["best"]))
        print(f"report: {report}")
        print(f"decision: {decision['verdict']}")
        written.append(report)
    return written


def is_generative(summary_path: Path) -> bool:
    try:
        return bool(json.loads(summary_path.read_text()).get("kind") == "generative")
    except (OSError, ValueError):
        return False
