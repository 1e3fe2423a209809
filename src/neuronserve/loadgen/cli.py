"""``python run_apis.py`` and ``neuronserve bench``: sweep load against servers, write a report."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from neuronserve import __version__
from neuronserve.config import ConfigError, Settings, load_settings
from neuronserve.loadgen.client import Sweep, run_sweep
from neuronserve.loadgen.http import Target, auth_headers
from neuronserve.loadgen.options import SHORTCUTS, build_parser
from neuronserve.loadgen.payloads import (
    Bucket,
    PayloadError,
    TokenCounter,
    build_payloads,
    load_texts,
    parse_buckets,
)
from neuronserve.loadgen.report import compare, write_all
from neuronserve.loadgen.stats import Budgets, Pricing, decide, knee


def _settings(args: argparse.Namespace) -> Settings:
    extra = [
        f"{key}={getattr(args, name)}" for name, key in SHORTCUTS.items() if getattr(args, name) is not None
    ]
    return load_settings(args.config, overrides=[*args.overrides, *extra])


def _headers(settings: Settings) -> dict[str, str]:
    return auth_headers(settings.api_key())


def _server_info(url: str, headers: dict[str, str]) -> dict[str, Any]:
    try:
        response = httpx.get(f"{url}/info", headers=headers, timeout=5)
        return dict(response.json()) if response.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return {}


def _artifacts(settings: Settings) -> Path | None:
    """The loaded model's artifacts (for its tokenizer), when they are on this host."""
    from neuronserve.artifacts import artifacts_directory
    from neuronserve.backends import choose_backend

    models = settings.per_model()
    chosen = models.get(settings.bench.model) or next(iter(models.values()))
    try:
        directory = artifacts_directory(chosen, choose_backend(chosen.trace.backend)[0])
    except Exception:
        return None
    return directory if directory.is_dir() else None


def _served(info: dict[str, Any], model: str) -> dict[str, Any]:
    """The /info entry of the loaded model: the one named, else the server's only one."""
    models = [m for m in info.get("models", []) if isinstance(m, dict)]
    if model:
        return next((m for m in models if m.get("name") == model), {})
    return models[0] if len(models) == 1 else {}


def monitoring_snapshot(settings: Settings, directory: Path) -> str:
    """Save the deployment's metrics right after the run; returns the report's note on them."""
    import json

    from neuronserve.deploy.local import run_dir

    directory.mkdir(parents=True, exist_ok=True)
    m = settings.monitor
    sources: dict[str, str] = {}
    plan_file = run_dir(settings).plan
    if plan_file.is_file():
        for server in json.loads(plan_file.read_text())["servers"]:
            sources[server["name"]] = f"http://127.0.0.1:{server['port']}/metrics"
    if m.enabled:
        sources["exporter"] = f"http://{m.host}:{m.port}/metrics"
    saved = []
    key = settings.api_key() if settings.serve.metrics_need_key else ""
    for name, url in sources.items():
        keyed = key and name != "exporter"  # serve.metrics_need_key: the servers want the key
        try:
            response = httpx.get(
                url, timeout=3, headers={"Authorization": f"Bearer {key}"} if keyed else None
            )
        except httpx.HTTPError:
            continue
        if response.status_code == 200:
            (directory / f"metrics-{name}.txt").write_text(response.text)
            saved.append(f"[{name}](metrics-{name}.txt) from {url}")
    if not saved:
        return "No metrics endpoint of a local deployment was reachable; nothing was saved."
    lines = ["Live metrics during the run came from:", *[f"- {s}" for s in saved]]
    if m.prometheus:
        lines.append(
            f"- Prometheus at http://127.0.0.1:{m.prometheus_port} (targets in {run_dir(settings).path / 'prometheus'})"
        )
    lines.append(
        "Snapshots were taken right after the last step. Dashboards: monitor/grafana/dashboards/*.json."
    )
    return "\n".join(lines)


def run(settings: Settings, *, progress: bool) -> list[Path]:
    b = settings.bench
    urls = [u.strip() for u in b.target.split(",") if u.strip()] or [
        f"http://{settings.deploy.host}:{settings.deploy.port}"
    ]
    headers = _headers(settings)
    info = _server_info(urls[0].rstrip("/"), headers)
    served = _served(info, b.model)
    path: str = b.route
    if b.route == "v2":
        name = b.model or served.get("name")
        if not name:
            raise ConfigError(
                "the v2 route needs a model name: pass --model NAME (the server's /info did not name one)"
            )
        path = f"/v2/models/{name}/infer"
    targets = [Target.parse(u, path) for u in urls]
    pricing = Pricing.load(settings.path(b.pricing_file) if b.pricing_file else None)
    dollars = pricing.per_hour(b.instance_type, b.instance_count)
    budgets = Budgets(b.latency_budget_ms, b.error_budget, b.cost_budget)
    levels = tuple(float(x) for x in (b.concurrency if b.mode == "closed" else b.rates))
    sweep = Sweep(
        b.mode, levels, b.duration_s, b.warmup_s, b.requests, b.timeout_s, b.processes, budgets, dollars
    )
    counter = TokenCounter(_artifacts(settings))
    texts = load_texts(str(settings.path(b.dataset)) if b.dataset else "", b.text_field)
    buckets: list[Bucket | None] = [*parse_buckets(b.token_buckets)] or [None]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    written = []
    for bucket in buckets:
        payloads = build_payloads(
            texts, b.route, counter, bucket, model=b.model, documents_per_query=b.documents_per_query
        )
        suffix = f"-{bucket.low}-{bucket.high}" if bucket else ""
        label = f"[{bucket.label}] " if bucket else ""
        steps, rows = run_sweep(sweep, targets, payloads, headers, progress=progress, name=label)
        knee_index = knee(steps)
        decision = decide(steps, budgets)
        token_counts = sorted(p.tokens for p in payloads)
        summary: dict[str, Any] = {
            "name": f"{b.name}{suffix}",
            "started_at": stamp,
            "config": {
                "targets": urls,
                "route": path,
                "model": b.model or served.get("name", "the server's default"),
                "mode": b.mode,
                "levels": list(levels),
                "duration_s": b.duration_s,
                "warmup_s": b.warmup_s,
                "requests": b.requests,
                "timeout_s": b.timeout_s,
                "processes": b.processes,
                "inputs": b.dataset or "built-in sample texts",
                "payloads": len(payloads),
                "token_unit": counter.unit,
                "token_range": f"{token_counts[0]}-{token_counts[-1]}",
                "budgets": {
                    "latency_p95_ms": b.latency_budget_ms,
                    "error_rate": b.error_budget,
                    "cost_per_million": b.cost_budget,
                },
                "instance_type": b.instance_type,
                "instance_count": b.instance_count,
                "dollars_per_hour": dollars,
            },
            "environment": {
                "client host": platform.node(),
                "client CPUs": os.cpu_count(),
                "python": platform.python_version(),
                "neuronserve": __version__,
                "server backend": info.get("backend", "unknown (no /info)"),
                "server model": served.get("name", "unknown"),
                "server models": ", ".join(str(m.get("name")) for m in info.get("models", [])) or "unknown",
                "server shapes": ", ".join(
                    f"b{s['batch_size']}xs{s['sequence_length']}" for s in served.get("shapes", [])
                )
                or "unknown",
                "server copies": served.get("copies", "unknown"),
            },
            "pricing": {"source": pricing.source, "date": pricing.date},
            "knee": knee_index,
            "decision": decision,
        }
        directory = settings.path(b.output_dir) / f"{b.name}{suffix}-{stamp}"
        summary["monitoring"] = monitoring_snapshot(settings, directory)
        report = write_all(directory, summary, steps, rows, counter.unit)
        from neuronserve.loadgen.report import steps_table

        print(steps_table(steps, knee_index, decision["best"]))
        print(f"report: {report}")
        print(f"decision: {decision['verdict']}")
        written.append(report)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python run_apis.py``: parse ``argv`` and run."""
    return run_parsed(build_parser().parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    """Run what the parsed options (see :mod:`neuronserve.loadgen.options`) ask for."""
    if args.compare:
        a, b = (Path(p) for p in args.compare)
        from neuronserve.loadgen.genrun import is_generative

        if is_generative(a / "summary.json") or is_generative(b / "summary.json"):
            import json

            from neuronserve.loadgen.genreport import compare as compare_generative

            summaries = [json.loads((d / "summary.json").read_text()) for d in (a, b)]
            if {s.get("kind") for s in summaries} != {"generative"} or not all(
                "steps" in s for s in summaries
            ):
                print(
                    "neuronserve bench: --compare needs two generative runs or two encoder runs",
                    file=sys.stderr,
                )
                return 2
            print(compare_generative(summaries[0], summaries[1]))
        else:
            print(compare(a, b))
        return 0
    try:
        settings = _settings(args)
        if settings.bench.api:
            from neuronserve.loadgen.genrun import run_generative

            run_generative(settings, progress=not args.no_progress)
        else:
            run(settings, progress=not args.no_progress)
    except (ConfigError, PayloadError, ValueError) as exc:
        print(f"neuronserve bench: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover - python -m neuronserve.loadgen.cli, as run_apis.py
    raise SystemExit(main())
