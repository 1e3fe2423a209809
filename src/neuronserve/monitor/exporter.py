"""The exporter: sources feed state in background threads; a custom collector exposes it.

Neuron data keeps AWS's exporter's exact metric names, types, HELP texts and label sets
(including ``memory_location="None"`` on the per-core memory gauges), so AWS's Grafana
dashboard works unchanged. Host data (cpu deployments) uses AWS's ``system_*`` names where
they mean the same thing and ``neuronserve_*`` names for the rest. A scrape never raises: a
source that died or stopped sending shows as ``neuronserve_exporter_source_up 0``, and a report
that is not JSON counts in ``neuronserve_exporter_parse_errors_total``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from neuronserve.monitor.host import HostSampler, HostState
from neuronserve.monitor.neuron_monitor import (
    CORE_MEMORY_TYPES,
    ECC_EVENTS,
    ERROR_TYPES,
    INSTANCE_LABELS,
    PERCENTILES,
    STATUS_TYPES,
    NeuronState,
    ReportError,
)

log = logging.getLogger(__name__)
RUNTIME_LABELS = (*INSTANCE_LABELS, "runtime_tag")


@dataclass
class SourceHealth:
    """What the exporter knows about one source's stream."""

    name: str
    period_s: float
    running: bool = False
    last_ok: float = 0.0
    reports: int = 0
    parse_errors: int = 0
    restarts: int = 0
    error: str = ""

    def up(self, now: float) -> bool:
        return self.running and self.last_ok > 0 and now - self.last_ok < 3 * self.period_s + 1


@dataclass
class ExporterState:
    neuron: NeuronState = field(default_factory=NeuronState)
    host: HostState = field(default_factory=HostState)
    sources: dict[str, SourceHealth] = field(default_factory=dict)


def neuron_monitor_config(period_s: float) -> dict[str, Any]:
    """The neuron-monitor configuration the exporter runs it with."""
    return {
        "period": f"{period_s:g}s",
        "neuron_runtimes": [
            {
                "tag_filter": ".*",
                "metrics": [
                    {"type": "neuroncore_counters"},
                    {"type": "memory_used"},
                    {"type": "neuron_runtime_vcpu_usage"},
                    {"type": "execution_stats"},
                ],
            }
        ],
        "system_metrics": [{"type": "vcpu_usage"}, {"type": "memory_info"}, {"type": "neuron_hw_counters"}],
    }


def _lines_from_process(command: list[str]) -> Iterator[str]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    with process.stdout:
        try:
            yield from process.stdout
        finally:
            if process.poll() is None:
                process.terminate()
            code = process.wait()
    raise RuntimeError(f"{command[0]} exited with {code}")


def _replay(path: Path, period_s: float) -> Iterator[str]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"{path}: no reports to replay")
    while True:  # a demo feed: the recorded reports, one per period, over and over
        for line in lines:
            yield line
            time.sleep(period_s)


def neuron_lines(source: str, *, period_s: float, replay_file: str, neuron_monitor: str) -> Iterator[str]:
    """Report lines of a neuron source: neuron-monitor, stdin or replay."""
    if source == "stdin":
        return iter(sys.stdin)
    if source == "replay":
        return _replay(Path(replay_file), period_s)
    tool = shutil.which(neuron_monitor) or neuron_monitor
    return _lines_with_config(tool, neuron_monitor_config(period_s))


def _lines_with_config(tool: str, config: dict[str, Any]) -> Iterator[str]:
    """neuron-monitor's lines, run with ``config`` in a temporary file removed when it ends."""
    with tempfile.TemporaryDirectory(prefix="neuronserve-monitor-") as directory:
        path = Path(directory) / "neuron-monitor.json"
        path.write_text(json.dumps(config))
        yield from _lines_from_process([tool, "-c", str(path)])


def pump(state: ExporterState, health: SourceHealth, lines: Iterable[str]) -> None:
    """Read reports until the source ends; never raises (the health records what happened)."""
    health.running = True
    health.error = ""
    try:
        for line in lines:
            if not line.strip():
                continue
            try:
                state.neuron.apply(json.loads(line))
            except (json.JSONDecodeError, ReportError) as exc:
                health.parse_errors += 1
                log.warning("source %s: unreadable report (%s)", health.name, exc)
                continue
            health.reports += 1
            health.last_ok = time.time()
    except Exception as exc:  # the source broke (process died, file vanished)
        health.error = f"{type(exc).__name__}: {exc}"
        log.error("source %s stopped: %s", health.name, health.error)
    finally:
        health.running = False


def supervise(
    state: ExporterState,
    health: SourceHealth,
    open_lines: Callable[[], Iterable[str]],
    stop: threading.Event,
    *,
    first_backoff_s: float = 1.0,
    max_backoff_s: float = 60.0,
) -> None:
    """Pump a source and start it again whenever it ends (neuron-monitor died, say), waiting
    1, 2, 4 ... up to ``max_backoff_s`` seconds between attempts; a source that ran for a
    minute starts again at the first delay. Restarts count in ``health.restarts``."""
    delay = first_backoff_s
    while not stop.is_set():
        started = time.monotonic()
        try:
            lines = open_lines()
        except Exception as exc:  # could not even start it (a temp file, say): try again later
            health.error = f"{type(exc).__name__}: {exc}"
        else:
            pump(state, health, lines)
        if time.monotonic() - started > 60:
            delay = first_backoff_s
        if stop.wait(delay):
            return
        health.restarts += 1
        log.warning("source %s ended (%s); starting it again", health.name, health.error or "end of stream")
        delay = min(delay * 2, max_backoff_s)


def sample_host(sampler: HostSampler, health: SourceHealth, stop: threading.Event) -> None:
    health.running = True
    try:
        while not stop.is_set():
            try:
                sampler.sample()
                health.reports += 1
                health.last_ok = time.time()
            except Exception as exc:
                health.parse_errors += 1
                health.error = f"{type(exc).__name__}: {exc}"
            stop.wait(health.period_s)
    finally:
        health.running = False


class ExporterCollector(Collector):
    """Builds every metric family from the state at scrape time."""

    def __init__(self, state: ExporterState) -> None:
        self.state = state

    def describe(self) -> Iterable[Metric]:
        # Names and types, without samples: the registry checks them for clashes once.
        return list(self._families(ExporterState()))

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._families(self.state))
        except Exception:  # a scrape never raises; the health gauge tells
            log.exception("collect failed")
            return list(self._health(self.state, broken=True))

    def _families(self, state: ExporterState) -> Iterator[Metric]:
        yield from self._neuron(state.neuron)
        yield from self._host(state.host)
        yield from self._system_of(state)
        yield from self._health(state, broken=False)

    def _system_of(self, state: ExporterState) -> Iterator[Metric]:
        """One set of system_* families: neuron-monitor's when it reports them, else the host's."""
        n, h = state.neuron, state.host
        with n.lock:
            if n.vcpu_count is not None or n.memory:
                inst = [n.instance[k] for k in INSTANCE_LABELS]
                yield from self._system(inst, n.vcpu_count, dict(n.vcpu_usage), dict(n.memory))
                return
        with h.lock:
            inst = ["", os.uname().nodename, "cpu", "", "", ""]
            count = h.vcpu_count if h.samples else None
            yield from self._system(inst, count, dict(h.vcpu_usage), dict(h.memory))

    def _neuron(self, n: NeuronState) -> Iterator[Metric]:
        with n.lock:
            inst = [n.instance[k] for k in INSTANCE_LABELS]
            util = GaugeMetricFamily(
                "neuroncore_utilization_ratio",
                "NeuronCore utilization ratio",
                labels=[*RUNTIME_LABELS, "neuroncore"],
            )
            vcpu = GaugeMetricFamily(
                "neuron_runtime_vcpu_usage_ratio",
                "Runtime vCPU utilization ratio",
                labels=[*RUNTIME_LABELS, "usage_type"],
            )
            mem = GaugeMetricFamily(
                "neuron_runtime_memory_used_bytes",
                "Runtime memory used bytes",
                labels=[*RUNTIME_LABELS, "memory_location"],
            )
            core_mem = {
                kind: GaugeMetricFamily(
                    f"neuroncore_memory_usage_{kind}",
                    f"NeuronCore memory utilization for {kind}",
                    labels=[*RUNTIME_LABELS, "memory_location", "neuroncore"],
                )
                for kind in CORE_MEMORY_TYPES
            }
            errors = CounterMetricFamily(
                "execution_errors", "Execution errors total", labels=[*RUNTIME_LABELS, "error_type"]
            )
            status = CounterMetricFamily(
                "execution_status", "Execution status total", labels=[*RUNTIME_LABELS, "status_type"]
            )
            latency = GaugeMetricFamily(
                "execution_latency_seconds",
                "Execution latency in seconds",
                labels=[*RUNTIME_LABELS, "percentile"],
            )
            for tag, rt in sorted(n.runtimes.items()):
                base = [*inst, tag]
                _add_all(util, base, sorted(rt.core_utilization.items()))
                _add_all(vcpu, base, sorted(rt.vcpu.items()))
                _add_all(mem, base, sorted(rt.memory.items()))
                for (kind, core), value in sorted(rt.core_memory.items()):
                    core_mem[kind].add_metric([*base, "None", core], value)
                _add_all(errors, base, [(k, rt.errors[k]) for k in ERROR_TYPES if k in rt.errors])
                _add_all(status, base, [(k, rt.status[k]) for k in STATUS_TYPES if k in rt.status])
                _add_all(latency, base, [(p, rt.latency[p]) for p in PERCENTILES if p in rt.latency])
            ecc = CounterMetricFamily(
                "hardware_ecc_events",
                "Hardware ecc events total",
                labels=[*INSTANCE_LABELS, "event_type", "neuron_device_index"],
            )
            for (device, event), value in sorted(
                n.ecc.items(), key=lambda kv: (int(kv[0][0]), ECC_EVENTS.index(kv[0][1]))
            ):
                ecc.add_metric([*inst, event, device], value)
            yield from (util, vcpu, mem, *core_mem.values(), errors, status, latency, ecc)
            info = InfoMetricFamily("instance", "EC2 instance information", labels=list(INSTANCE_LABELS))
            if n.reports:
                info.add_metric(inst, {})
            yield info
            hardware = InfoMetricFamily(
                "neuron_hardware", "Neuron hardware information", labels=list(INSTANCE_LABELS)
            )
            if n.hardware is not None:
                hardware.add_metric(inst, n.hardware)
            yield hardware

    @staticmethod
    def _system(
        inst: list[str], count: float | None, usage: dict[str, float], memory: dict[str, float]
    ) -> Iterator[Metric]:
        vcpus = GaugeMetricFamily("system_vcpu_count", "System vCPU count", labels=list(INSTANCE_LABELS))
        if count is not None:
            vcpus.add_metric(inst, count)
        ratio = GaugeMetricFamily(
            "system_vcpu_usage_ratio", "System CPU utilization ratio", labels=[*INSTANCE_LABELS, "usage_type"]
        )
        for kind, value in sorted(usage.items()):
            ratio.add_metric([*inst, kind], value)
        yield vcpus
        yield ratio
        for key in ("memory_total_bytes", "memory_used_bytes", "swap_total_bytes", "swap_used_bytes"):
            area, _, what = key.partition("_")
            family = GaugeMetricFamily(
                f"system_{key}", f"System {area} {what} bytes", labels=list(INSTANCE_LABELS)
            )
            if key in memory:
                family.add_metric(inst, memory[key])
            yield family

    def _host(self, h: HostState) -> Iterator[Metric]:
        with h.lock:
            cpu = GaugeMetricFamily(
                "neuronserve_host_cpu_utilization_ratio",
                "Utilization of each CPU of the deployment",
                labels=["cpu"],
            )
            for name, value in sorted(h.cpu_utilization.items(), key=lambda kv: int(kv[0])):
                cpu.add_metric([name], value)
            server_cpu = GaugeMetricFamily(
                "neuronserve_server_cpu_ratio",
                "CPU used by each server's processes (1 = one core)",
                labels=["server"],
            )
            server_rss = GaugeMetricFamily(
                "neuronserve_server_memory_rss_bytes",
                "Resident memory of each server's processes",
                labels=["server"],
            )
            for name, value in sorted(h.server_cpu.items()):
                server_cpu.add_metric([name], value)
            for name, value in sorted(h.server_rss.items()):
                server_rss.add_metric([name], value)
            yield from (cpu, server_cpu, server_rss)

    @staticmethod
    def _health(state: ExporterState, broken: bool) -> Iterator[Metric]:
        now = time.time()
        up = GaugeMetricFamily(
            "neuronserve_exporter_source_up",
            "1 when the source delivered a report recently",
            labels=["source"],
        )
        errors = CounterMetricFamily(
            "neuronserve_exporter_parse_errors", "Reports that could not be read", labels=["source"]
        )
        reports = CounterMetricFamily("neuronserve_exporter_reports", "Reports read", labels=["source"])
        restarts = CounterMetricFamily(
            "neuronserve_exporter_source_restarts",
            "Times a source that ended was started again",
            labels=["source"],
        )
        for name, health in sorted(state.sources.items()):
            up.add_metric([name], 0.0 if broken else float(health.up(now)))
            errors.add_metric([name], health.parse_errors)
            reports.add_metric([name], health.reports)
            restarts.add_metric([name], health.restarts)
        yield from (up, errors, reports, restarts)


def _add_all(
    family: GaugeMetricFamily | CounterMetricFamily, base: list[str], items: Iterable[tuple[str, float]]
) -> None:
    for label, value in items:
        family.add_metric([*base, label], value)


def build_registry(state: ExporterState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ExporterCollector(state))
    return registry
