"""Grafana dashboards defined in code with grafana-foundation-sdk's typed builders.

``neuronserve dashboards`` writes them to ``monitor/grafana/dashboards/*.json``; a test fails
when the committed JSON differs from what this code generates. Queries use
``$__rate_interval``, which Grafana fills in from the scrape interval.

They import into any Grafana as they are: the Prometheus data source is the ``$datasource``
variable (no uid of ours), and every series is filtered by ``$deployment`` (the label deploy's
scrape targets and the k8s PodMonitors carry) and, on the serving dashboard, ``$model``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, QueryVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery as PrometheusQuery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos, VariableRefresh, VariableSort

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every metric the dashboards query starts with one of these (ours, and neuron-monitor's names).
METRIC = re.compile(
    r"\b((?:neuronserve|neuroncore|neuron|execution|hardware|system)_[a-z_]+|vllm:[a-z0-9_]+)(\{([^}]*)\})?"
)
BY_DEPLOYMENT = 'deployment=~"$deployment"'
BY_MODEL = 'model=~"$model"'
# vLLM's metrics name the model in model_name.
BY_ENGINE_MODEL = 'model_name=~"$model"'
INFERENCE_ROUTES = 'route=~"/predict|/v1/embeddings|/rerank|/v1/rerank|/v2/models/.*/infer"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    unit: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # or "stat"
    width: int = 12


def _quantiles(metric: str, by: str = "") -> tuple[Query, ...]:
    group = f"le{', ' + by if by else ''}"
    suffix = f" {{{{{by}}}}}" if by else ""
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[$__rate_interval])))",
            f"p{int(q * 100)}{suffix}",
        )
        for q in (0.5, 0.95, 0.99)
    )


SERVING: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    (
        "Traffic",
        (
            PanelSpec(
                "Requests per second by status code",
                "reqps",
                (Query("sum by (code) (rate(neuronserve_requests_total[$__rate_interval]))", "{{code}}"),),
            ),
            PanelSpec(
                "Requests per second per model (inference routes)",
                "reqps",
                (
                    Query(
                        f"sum by (model) (rate(neuronserve_requests_total{{{INFERENCE_ROUTES}}}[$__rate_interval]))",
                        "{{model}}",
                    ),
                ),
            ),
            PanelSpec(
                "Request latency per model (inference routes)",
                "s",
                tuple(
                    Query(
                        f"histogram_quantile({q}, sum by (le, model) (rate(neuronserve_request_duration_seconds_bucket{{{INFERENCE_ROUTES}}}[$__rate_interval])))",
                        f"p{int(q * 100)} {{{{model}}}}",
                    )
                    for q in (0.5, 0.95, 0.99)
                ),
            ),
            PanelSpec(
                "Queue vs inference time per model (p50)",
                "s",
                (
                    Query(
                        "histogram_quantile(0.5, sum by (le, model) (rate(neuronserve_queue_duration_seconds_bucket[$__rate_interval])))",
                        "queue {{model}}",
                    ),
                    Query(
                        "histogram_quantile(0.5, sum by (le, model) (rate(neuronserve_inference_duration_seconds_bucket[$__rate_interval])))",
                        "inference {{model}}",
                    ),
                ),
            ),
            PanelSpec(
                "Padding efficiency per shape (real tokens / tokens computed)",
                "percentunit",
                (
                    Query(
                        "sum by (model, shape) (rate(neuronserve_real_tokens_total[$__rate_interval])) / sum by (model, shape) (rate(neuronserve_padded_tokens_total[$__rate_interval]))",
                        "{{model}} {{shape}}",
                    ),
                ),
            ),
            PanelSpec(
                "Batch size per model (real inputs per model call)",
                "short",
                (
                    Query(
                        "sum by (model) (rate(neuronserve_batch_size_sum[$__rate_interval])) / sum by (model) (rate(neuronserve_batch_size_count[$__rate_interval]))",
                        "mean {{model}}",
                    ),
                    Query(
                        "histogram_quantile(0.95, sum by (le, model) (rate(neuronserve_batch_size_bucket[$__rate_interval])))",
                        "p95 {{model}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Backpressure",
        (
            PanelSpec(
                "Queue depth per server and model",
                "short",
                (Query("sum by (server, model) (neuronserve_queue_depth)", "{{server}} {{model}}"),),
            ),
            PanelSpec(
                "In-flight requests per server and model",
                "short",
                (Query("sum by (server, model) (neuronserve_inflight_requests)", "{{server}} {{model}}"),),
            ),
            PanelSpec(
                "Rejections by reason",
                "reqps",
                (
                    Query(
                        "sum by (reason, model) (rate(neuronserve_rejections_total[$__rate_interval]))",
                        "{{reason}} {{model}}",
                    ),
                ),
            ),
            PanelSpec(
                "Copies ready per model",
                "short",
                (Query("sum by (model) (neuronserve_copies_ready)", "{{model}}"),),
                kind="stat",
            ),
        ),
    ),
    (
        "Per server and copy",
        (
            PanelSpec(
                "Requests per second per server",
                "reqps",
                (
                    Query(
                        f"sum by (server) (rate(neuronserve_requests_total{{{INFERENCE_ROUTES}}}[$__rate_interval]))",
                        "{{server}}",
                    ),
                ),
            ),
            PanelSpec(
                "p95 latency per server",
                "s",
                (
                    Query(
                        f"histogram_quantile(0.95, sum by (le, server) (rate(neuronserve_request_duration_seconds_bucket{{{INFERENCE_ROUTES}}}[$__rate_interval])))",
                        "{{server}}",
                    ),
                ),
            ),
            PanelSpec(
                "Inputs per second per copy",
                "short",
                (
                    Query(
                        "sum by (server, model, copy) (rate(neuronserve_copy_items_total[$__rate_interval]))",
                        "{{server}} {{model}} copy {{copy}}",
                    ),
                ),
                width=24,
            ),
        ),
    ),
)

CORES: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    (
        "NeuronCores (neuron-monitor)",
        (
            PanelSpec(
                "NeuronCore utilization",
                "percentunit",
                (Query("avg by (neuroncore) (neuroncore_utilization_ratio)", "nc{{neuroncore}}"),),
            ),
            PanelSpec(
                "Runtime memory (device and host)",
                "bytes",
                (
                    Query(
                        "sum by (memory_location) (neuron_runtime_memory_used_bytes)", "{{memory_location}}"
                    ),
                ),
            ),
            PanelSpec(
                "Execution latency",
                "s",
                (Query("avg by (percentile) (execution_latency_seconds)", "{{percentile}}"),),
            ),
            PanelSpec(
                "Executions by status",
                "ops",
                (
                    Query(
                        "sum by (status_type) (rate(execution_status_total[$__rate_interval]))",
                        "{{status_type}}",
                    ),
                ),
            ),
            PanelSpec(
                "Execution errors by type",
                "ops",
                (
                    Query(
                        "sum by (error_type) (rate(execution_errors_total[$__rate_interval]))",
                        "{{error_type}}",
                    ),
                ),
            ),
            PanelSpec(
                "Runtime vCPU",
                "percentunit",
                (Query("avg by (usage_type) (neuron_runtime_vcpu_usage_ratio)", "{{usage_type}}"),),
            ),
            PanelSpec(
                "Device memory per core (tensors and constants)",
                "bytes",
                (
                    Query(
                        "sum by (neuroncore) (neuroncore_memory_usage_tensors)", "nc{{neuroncore}} tensors"
                    ),
                    Query(
                        "sum by (neuroncore) (neuroncore_memory_usage_constants)",
                        "nc{{neuroncore}} constants",
                    ),
                ),
            ),
            PanelSpec(
                "Hardware ECC events",
                "short",
                (
                    Query(
                        "sum by (event_type) (increase(hardware_ecc_events_total[$__rate_interval]))",
                        "{{event_type}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Host (every backend) and cpu-backend equivalents",
        (
            PanelSpec(
                "Host vCPU",
                "percentunit",
                (Query("avg by (usage_type) (system_vcpu_usage_ratio)", "{{usage_type}}"),),
            ),
            PanelSpec(
                "Host memory used",
                "percentunit",
                (Query("avg(system_memory_used_bytes / system_memory_total_bytes)", "used"),),
            ),
            PanelSpec(
                "CPU utilization per core (cpu backend)",
                "percentunit",
                (Query("avg by (cpu) (neuronserve_host_cpu_utilization_ratio)", "cpu{{cpu}}"),),
            ),
            PanelSpec(
                "Server CPU (cores' worth)",
                "short",
                (Query("sum by (server) (neuronserve_server_cpu_ratio)", "{{server}}"),),
            ),
            PanelSpec(
                "Server resident memory",
                "bytes",
                (Query("sum by (server) (neuronserve_server_memory_rss_bytes)", "{{server}}"),),
            ),
            PanelSpec(
                "Exporter sources up",
                "short",
                (Query("min by (source) (neuronserve_exporter_source_up)", "{{source}}"),),
                kind="stat",
            ),
        ),
    ),
)


# Text-generation deployments: every copy's vLLM metrics, labelled by deployment and copy.
GENERATION: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    (
        "Latency",
        (
            PanelSpec("Time to first token", "s", _quantiles("vllm:time_to_first_token_seconds")),
            PanelSpec("Inter-token latency", "s", _quantiles("vllm:inter_token_latency_seconds")),
            PanelSpec("Request latency (end to end)", "s", _quantiles("vllm:e2e_request_latency_seconds")),
            PanelSpec("Time queued before running", "s", _quantiles("vllm:request_queue_time_seconds")),
        ),
    ),
    (
        "Throughput and load",
        (
            PanelSpec(
                "Tokens per second per copy",
                "short",
                (
                    Query(
                        "sum by (copy) (rate(vllm:generation_tokens_total[$__rate_interval]))",
                        "output {{copy}}",
                    ),
                    Query(
                        "sum by (copy) (rate(vllm:prompt_tokens_total[$__rate_interval]))", "prompt {{copy}}"
                    ),
                ),
            ),
            PanelSpec(
                "Requests running and waiting per copy",
                "short",
                (
                    Query("sum by (copy) (vllm:num_requests_running)", "running {{copy}}"),
                    Query("sum by (copy) (vllm:num_requests_waiting)", "waiting {{copy}}"),
                ),
            ),
            PanelSpec(
                "KV cache usage per copy",
                "percentunit",
                (Query("max by (copy) (vllm:kv_cache_usage_perc)", "{{copy}}"),),
            ),
            PanelSpec(
                "Requests finished per second by reason (error and abort are failures)",
                "reqps",
                (
                    Query(
                        "sum by (finished_reason) (rate(vllm:request_success_total[$__rate_interval]))",
                        "{{finished_reason}}",
                    ),
                ),
            ),
        ),
    ),
)


def filtered(expr: str, matchers: tuple[str, ...]) -> str:
    """``expr`` with ``matchers`` added to every metric selector in it."""

    def add(match: re.Match[str]) -> str:
        own = match.group(3)
        return f"{match.group(1)}{{{', '.join((*matchers, *([own] if own else [])))}}}"

    return METRIC.sub(add, expr)


def _variables(dashboard: Dashboard, by_model: bool, engine: bool = False) -> Dashboard:
    """$datasource, $deployment and (serving, generation) $model; the label queries follow each other."""
    dashboard = dashboard.with_variable(
        DatasourceVariable("datasource").label("Data source").type("prometheus")
    )
    series = (
        "vllm:num_requests_running"
        if engine
        else "neuronserve_server_info"
        if by_model
        else "neuronserve_exporter_source_up"
    )
    chosen = [("deployment", f"label_values({series}, deployment)")]
    if by_model:
        label = "model_name" if engine else "model"
        chosen.append(("model", f"label_values({series}{{{BY_DEPLOYMENT}}}, {label})"))
    for name, query in chosen:
        dashboard = dashboard.with_variable(
            QueryVariable(name)
            .label(name.capitalize())
            .datasource(DATASOURCE)
            .query(query)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    return dashboard


def build(
    title: str,
    uid: str,
    rows: tuple[tuple[str, tuple[PanelSpec, ...]], ...],
    *,
    by_model: bool,
    engine: bool = False,
) -> dict[str, Any]:
    """``engine``: the series are an LLM engine's (vLLM: the model in model_name)."""
    dashboard = (
        Dashboard(title).uid(uid).tags(["neuronserve", "generated"]).refresh("10s").time("now-30m", "now")
    )
    dashboard = _variables(dashboard, by_model, engine)
    model = BY_ENGINE_MODEL if engine else BY_MODEL
    matchers = (BY_DEPLOYMENT, model) if by_model else (BY_DEPLOYMENT,)
    y = 0
    for row_title, panels in rows:
        dashboard = dashboard.with_row(Row(row_title).grid_pos(GridPos(h=1, w=24, x=0, y=y)))
        y += 1
        x = 0
        for spec in panels:
            if x + spec.width > 24:
                x, y = 0, y + 8
            panel = (
                (Stat() if spec.kind == "stat" else Timeseries())
                .title(spec.title)
                .unit(spec.unit)
                .datasource(DATASOURCE)
            )
            for ref, query in zip("ABCDEFGH", spec.queries, strict=False):
                panel = panel.with_target(
                    PrometheusQuery()
                    .expr(filtered(query.expr, matchers))
                    .legend_format(query.legend)
                    .ref_id(ref)
                    .datasource(DATASOURCE)
                )
            dashboard = dashboard.with_panel(panel.grid_pos(GridPos(h=8, w=spec.width, x=x, y=y)))
            x += spec.width
        y += 8
    return dict(json.loads(json.dumps(dashboard.build(), cls=JSONEncoder)))


def dashboards() -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON."""
    return {
        "neuronserve-serving.json": build(
            "neuronserve: serving", "neuronserve-serving", SERVING, by_model=True
        ),
        "neuronserve-cores.json": build("neuronserve: cores", "neuronserve-cores", CORES, by_model=False),
        "neuronserve-generation.json": build(
            "neuronserve: generation", "neuronserve-generation", GENERATION, by_model=True, engine=True
        ),
    }


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def expressions(document: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard."""
    return [t["expr"] for p in document.get("panels", []) for t in p.get("targets", []) if t.get("expr")]


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, document in dashboards().items():
        path = directory / name
        path.write_text(render(document))
        written.append(path)
    return written
