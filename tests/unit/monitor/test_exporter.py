"""The neuron-monitor parser and the exporter: the sample report, variants, random reports, AWS names."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from neuronserve.monitor import dashboards
from neuronserve.monitor.exporter import ExporterState, SourceHealth, build_registry, pump
from neuronserve.monitor.neuron_monitor import NeuronState, ReportError
from neuronserve.monitor.prometheus import render_prometheus_yml
from tests.conftest import REPO, make_settings

# The sample report from the project's research notes (shared/reference), kept as a fixture.
SAMPLE = json.loads((REPO / "tests" / "fixtures" / "neuron-monitor-sample.json").read_text())

L = {"instance_name", "instance_id", "instance_type", "availability_zone", "region", "subnet_id"}
R = L | {"runtime_tag"}
# AWS's neuron-monitor-prometheus.py: metric name -> (type, label names) (shared/reference/neuron.md §2.2)
AWS = {
    "neuroncore_utilization_ratio": ("gauge", R | {"neuroncore"}),
    "neuron_runtime_vcpu_usage_ratio": ("gauge", R | {"usage_type"}),
    "neuron_runtime_memory_used_bytes": ("gauge", R | {"memory_location"}),
    "neuroncore_memory_usage_constants": ("gauge", R | {"memory_location", "neuroncore"}),
    "neuroncore_memory_usage_model_code": ("gauge", R | {"memory_location", "neuroncore"}),
    "neuroncore_memory_usage_model_shared_scratchpad": ("gauge", R | {"memory_location", "neuroncore"}),
    "neuroncore_memory_usage_runtime_memory": ("gauge", R | {"memory_location", "neuroncore"}),
    "neuroncore_memory_usage_tensors": ("gauge", R | {"memory_location", "neuroncore"}),
    "execution_errors": ("counter", R | {"error_type"}),
    "execution_status": ("counter", R | {"status_type"}),
    "execution_latency_seconds": ("gauge", R | {"percentile"}),
    "hardware_ecc_events": ("counter", L | {"event_type", "neuron_device_index"}),
    "system_vcpu_count": ("gauge", L),
    "system_vcpu_usage_ratio": ("gauge", L | {"usage_type"}),
    "system_memory_total_bytes": ("gauge", L),
    "system_memory_used_bytes": ("gauge", L),
    "system_swap_total_bytes": ("gauge", L),
    "system_swap_used_bytes": ("gauge", L),
    # prometheus_client's Info, as AWS's exporter uses it, is exposed as a gauge named *_info
    "instance_info": ("gauge", L),
    "neuron_hardware_info": ("gauge", L | {"neuron_device_count", "neuroncore_per_device_count"}),
}


def exposition(*reports: Any) -> dict[str, Any]:
    state = ExporterState()
    for report in reports:
        state.neuron.apply(report)
    text = generate_latest(build_registry(state)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_sample_report_values() -> None:
    n = NeuronState()
    n.apply(SAMPLE)
    rt = n.runtimes["my_app_1"]
    assert rt.core_utilization["0"] == pytest.approx(
        SAMPLE["neuron_runtime_data"][0]["report"]["neuroncore_counters"]["neuroncores_in_use"]["0"][
            "neuroncore_utilization"
        ]
        / 100
    )
    assert rt.status["completed"] == 123
    assert rt.latency["p50"] == pytest.approx(0.01100008)  # total_latency, not device_latency
    n.apply(SAMPLE)
    assert n.runtimes["my_app_1"].status["completed"] == 246  # per-period counts accumulate
    assert n.instance["instance_type"] == "inf2.xlarge"
    assert n.hardware == {"neuron_device_count": "1", "neuroncore_per_device_count": "2"}


def test_exposition_matches_aws_names_types_and_labels() -> None:
    families = exposition(SAMPLE)
    for name, (kind, labels) in AWS.items():
        assert name in families, name
        family = families[name]
        assert family.type == kind, name
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            assert set(sample.labels) == labels, (name, sample.labels)
    core_mem = families["neuroncore_memory_usage_tensors"].samples[0]
    assert core_mem.labels["memory_location"] == "None"  # AWS's exporter's quirk, kept
    assert families["neuroncore_utilization_ratio"].documentation == "NeuronCore utilization ratio"
    assert families["execution_errors"].documentation == "Execution errors total"
    assert families["system_memory_total_bytes"].documentation == "System memory total_bytes bytes"
    util = {s.labels["neuroncore"]: s.value for s in families["neuroncore_utilization_ratio"].samples}
    assert all(0.0 <= v <= 1.0 for v in util.values())
    assert "neuronserve_exporter_source_up" in families


def _variant(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    report = copy.deepcopy(SAMPLE)
    node = report
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return dict(report)


RT = ("neuron_runtime_data", 0, "report")


@pytest.mark.parametrize(
    ("report", "check"),
    [
        (
            _variant((*RT, "neuroncore_counters", "neuroncores_in_use", "0", "flops"), KeyError),
            lambda f: "neuroncore_utilization_ratio" in f,
        ),
        (
            _variant((*RT, "execution_stats", "latency_stats", "total_latency"), None),
            lambda f: not f["execution_latency_seconds"].samples,
        ),
        (
            _variant((*RT, "memory_used"), KeyError),
            lambda f: not f["neuron_runtime_memory_used_bytes"].samples,
        ),
        (_variant((*RT, "execution_stats", "error"), "timeout"), lambda f: not f["execution_status"].samples),
        (
            _variant(("neuron_runtime_data", 0, "error"), "runtime gone"),
            lambda f: not f["neuroncore_utilization_ratio"].samples,
        ),
        (_variant(("neuron_runtime_data",), []), lambda f: not f["neuroncore_utilization_ratio"].samples),
        (
            _variant(("neuron_runtime_data", 0, "address"), KeyError),
            lambda f: bool(f["neuroncore_utilization_ratio"].samples),
        ),
        (_variant(("system_data",), KeyError), lambda f: not f["system_vcpu_count"].samples),
        (
            _variant(
                ("neuron_hardware_info",),
                {"neuron_device_count": 1, "neuroncore_per_device_count": 4, "error": ""},
            ),
            lambda f: bool(f["neuron_hardware_info"].samples),
        ),
    ],
)
def test_schema_variations(report: dict[str, Any], check: Any) -> None:
    assert check(exposition(report))


def test_effective_flops_and_old_inference_names() -> None:
    report = copy.deepcopy(SAMPLE)
    core = report["neuron_runtime_data"][0]["report"]["neuroncore_counters"]["neuroncores_in_use"]["0"]
    core["effective_flops"] = core.pop("flops", 0)
    stats = report["neuron_runtime_data"][0]["report"].pop("execution_stats")
    stats["inference_summary"] = stats.pop("execution_summary")
    report["neuron_runtime_data"][0]["report"]["inference_stats"] = stats
    families = exposition(report)
    assert {
        s.labels["status_type"]: s.value
        for s in families["execution_status"].samples
        if s.name.endswith("_total")
    }["completed"] == 123


def test_empty_runtime_data_clears_series_like_aws() -> None:
    families = exposition(SAMPLE, _variant(("neuron_runtime_data",), []))
    assert not families["execution_status"].samples  # counters restart with the runtime


def test_bad_lines_count_as_parse_errors_and_the_source_ends_down() -> None:
    state = ExporterState()
    health = SourceHealth("replay", period_s=1.0)
    state.sources["replay"] = health
    pump(state, health, [json.dumps(SAMPLE), "{not json", "[1, 2]", json.dumps(SAMPLE)])
    assert (health.reports, health.parse_errors, health.running) == (2, 2, False)
    families = exposition()
    assert "neuronserve_exporter_parse_errors" in families
    text = generate_latest(build_registry(state)).decode()
    assert 'neuronserve_exporter_parse_errors_total{source="replay"} 2.0' in text
    assert 'neuronserve_exporter_source_up{source="replay"} 0.0' in text  # the stream ended


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)
KEYS = [
    "neuron_runtime_data",
    "system_data",
    "instance_info",
    "neuron_hardware_info",
    "report",
    "neuroncore_counters",
    "neuroncores_in_use",
    "execution_stats",
    "latency_stats",
    "total_latency",
    "memory_used",
    "error",
    "0",
    "p50",
]
structured = st.recursive(
    json_values,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(structured)
def test_random_reports_never_raise(report: Any) -> None:
    state = ExporterState()
    try:
        state.neuron.apply(report)
    except ReportError:
        assert not isinstance(report, dict)
    generate_latest(build_registry(state))  # and a scrape never raises


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["0", "1", "x"]),
        st.dictionaries(st.sampled_from(["neuroncore_utilization", "flops"]), json_values),
    )
)
def test_random_core_counters(cores: dict[str, Any]) -> None:
    report = copy.deepcopy(SAMPLE)
    report["neuron_runtime_data"][0]["report"]["neuroncore_counters"]["neuroncores_in_use"] = cores
    state = ExporterState()
    state.neuron.apply(report)
    generate_latest(build_registry(state))


def test_committed_dashboards_are_generated() -> None:
    for name, document in dashboards.dashboards().items():
        committed = (REPO / "monitor" / "grafana" / "dashboards" / name).read_text()
        assert committed == dashboards.render(document), f"regenerate: neuronserve dashboards ({name})"
    assert (REPO / "monitor" / "prometheus" / "prometheus.yml").read_text() == render_prometheus_yml(5.0)


def test_a_local_deployment_whose_metrics_need_the_key_gives_prometheus_the_key(tmp_path: Path) -> None:
    """serve.metrics_need_key: the deployment's prometheus.yml sends the servers' API key from a
    file only its owner reads; promtool (Prometheus's own checker) accepts the config."""
    from neuronserve.backends import BackendKind
    from neuronserve.deploy.inventory import Inventory
    from neuronserve.deploy.local import RunDir, _write_prometheus
    from neuronserve.deploy.plan import make_plan

    settings = make_settings(tmp_path, serve__api_key="s3cret", serve__metrics_need_key="true")
    plan = make_plan(settings, Inventory("cpu", (0, 1), {}), BackendKind.CPU)
    run = RunDir(tmp_path / "run")
    (run.path / "prometheus").mkdir(parents=True)
    _write_prometheus(settings, plan, run)
    key = run.path / "prometheus" / "api-key"
    assert key.read_text() == "s3cret" and key.stat().st_mode & 0o077 == 0
    config = run.path / "prometheus" / "prometheus.yml"
    assert f"credentials_file: {key}" in config.read_text()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed: the config is unchecked")
    checked = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# PromQL words that are not metric names, in the dashboards' expressions.
_PROMQL = {"sum", "avg", "min", "max", "by", "rate", "increase", "histogram_quantile"}


def _selectors(expr: str) -> list[tuple[str, str]]:
    """Every (metric, matchers) of ``expr``: grouping labels and range durations left out."""
    expr = re.sub(r"\bby \([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    masked = re.sub(r'"[^"]*"', lambda m: '"' + "x" * (len(m.group()) - 2) + '"', expr)  # same length
    found = []
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?", masked):
        name = match.group(1)
        if name not in _PROMQL:
            found.append((name, expr[match.start(2) : match.end(2)] if match.group(2) else ""))
    return found


@pytest.mark.parametrize(
    "name", ["neuronserve-serving.json", "neuronserve-cores.json", "neuronserve-generation.json"]
)
def test_committed_dashboards_import_into_any_grafana(name: str) -> None:
    """No data source uid of ours: $datasource; every series filtered by $deployment (and on the
    serving and generation dashboards $model), each variable offering All."""
    document = json.loads((REPO / "monitor" / "grafana" / "dashboards" / name).read_text())
    variables = {v["name"]: v for v in document["templating"]["list"]}
    by_model = name != "neuronserve-cores.json"
    model_matcher = 'model_name=~"$model"' if name == "neuronserve-generation.json" else 'model=~"$model"'

    assert set(variables) == (
        {"datasource", "deployment", "model"} if by_model else {"datasource", "deployment"}
    )
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for label in set(variables) - {"datasource"}:
        variable = variables[label]
        assert variable["type"] == "query" and variable["includeAll"] and variable["allValue"] == ".*"
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        source = "model_name" if label == "model" and name == "neuronserve-generation.json" else label
        assert variable["query"].startswith("label_values(") and variable["query"].endswith(f", {source})")
    panels = [p for p in document["panels"] if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            selectors = _selectors(target["expr"])
            assert selectors, target["expr"]
            for metric, matchers in selectors:
                assert 'deployment=~"$deployment"' in matchers, (panel["title"], metric)
                assert (model_matcher in matchers) == by_model, (panel["title"], metric)
    assert '"uid": "prometheus"' not in json.dumps(document)


def test_dashboards_cover_serving_and_cores() -> None:
    serving = dashboards.expressions(dashboards.dashboards()["neuronserve-serving.json"])
    cores = dashboards.expressions(dashboards.dashboards()["neuronserve-cores.json"])
    for metric in (
        "neuronserve_requests_total",
        "neuronserve_queue_depth",
        "neuronserve_rejections_total",
        "neuronserve_batch_size",
        "neuronserve_copy_items_total",
    ):
        assert any(metric in e for e in serving), metric
    for metric in (
        "neuroncore_utilization_ratio",
        "execution_latency_seconds",
        "execution_errors_total",
        "neuronserve_host_cpu_utilization_ratio",
        "system_vcpu_usage_ratio",
    ):
        assert any(metric in e for e in cores), metric


def test_a_neuron_monitor_that_dies_is_started_again_with_backoff(tmp_path: Any) -> None:
    """A stand-in neuron-monitor (a real process) that prints one report and crashes each time."""
    import os
    import threading
    import time

    from neuronserve.monitor.exporter import neuron_lines, supervise

    report = json.dumps(json.loads((REPO / "tests" / "fixtures" / "neuron-monitor-sample.json").read_text()))
    (tmp_path / "report.json").write_text(report + "\n")
    tool = tmp_path / "neuron-monitor"
    tool.write_text(f"#!/bin/sh\ncat {tmp_path / 'report.json'}\nexit 1\n")
    os.chmod(tool, 0o755)
    state = ExporterState()
    health = SourceHealth("neuron-monitor", period_s=1.0)
    state.sources["neuron-monitor"] = health
    stop = threading.Event()

    def open_lines() -> Any:
        return neuron_lines("neuron-monitor", period_s=1.0, replay_file="", neuron_monitor=str(tool))

    thread = threading.Thread(
        target=supervise,
        args=(state, health, open_lines, stop),
        kwargs={"first_backoff_s": 0.05},
        daemon=True,
    )
    thread.start()
    deadline = time.monotonic() + 30
    while health.restarts < 3 and time.monotonic() < deadline:
        time.sleep(0.02)  # poll interval
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert health.restarts >= 3 and health.reports >= 3  # each new process delivered its report
    assert "exited with 1" in health.error
    text = generate_latest(build_registry(state)).decode()
    assert 'neuronserve_exporter_source_restarts_total{source="neuron-monitor"}' in text
