"""neuron-monitor reports folded into exporter state, tolerant of every schema variation seen.

Each report is one JSON document (one line of neuron-monitor's stream). Counts in a report are
for its period, so counters accumulate them (AWS's exporter does ``.inc(value)``); percents
become ratios. Accepted variations: ``flops`` or ``effective_flops`` or neither, null
latencies, missing groups, a group or runtime with a non-empty ``error`` (skipped), an empty
``neuron_runtime_data`` (every runtime series is cleared, as AWS's exporter does), the pre-2.10
``inference_stats`` / ``inference_summary`` names, a missing ``address``, and older
``neuron_hardware_info`` with only the two core counts. Anything else that is not the expected
type is ignored field by field, so a report never raises past :meth:`NeuronState.apply`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

INSTANCE_LABELS = (
    "instance_name",
    "instance_id",
    "instance_type",
    "availability_zone",
    "region",
    "subnet_id",
)
ERROR_TYPES = ("generic", "numerical", "transient", "model", "runtime", "hardware")
STATUS_TYPES = (
    "completed",
    "completed_with_err",
    "completed_with_num_err",
    "timed_out",
    "incorrect_input",
    "failed_to_queue",
)
PERCENTILES = ("p0", "p1", "p25", "p50", "p75", "p99", "p100")
CORE_MEMORY_TYPES = ("constants", "model_code", "model_shared_scratchpad", "runtime_memory", "tensors")
ECC_EVENTS = ("mem_ecc_corrected", "mem_ecc_uncorrected", "sram_ecc_corrected", "sram_ecc_uncorrected")


class ReportError(ValueError):
    """A report that is not a JSON object at all (a parse error, counted by the exporter)."""


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _group(container: Any, *names: str) -> dict[str, Any] | None:
    """The first present group of ``names`` in ``container`` whose ``error`` is empty."""
    if not isinstance(container, dict):
        return None
    for name in names:
        group = container.get(name)
        if isinstance(group, dict):
            return None if group.get("error") else group
    return None


@dataclass
class RuntimeState:
    tag: str
    core_utilization: dict[str, float] = field(default_factory=dict)
    vcpu: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    core_memory: dict[tuple[str, str], float] = field(default_factory=dict)  # (type, core) -> bytes
    latency: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)  # cumulative
    status: dict[str, float] = field(default_factory=dict)  # cumulative


@dataclass
class NeuronState:
    """Everything the exporter exposes from neuron-monitor, updated report by report."""

    instance: dict[str, str] = field(default_factory=lambda: dict.fromkeys(INSTANCE_LABELS, ""))
    hardware: dict[str, str] | None = None
    runtimes: dict[str, RuntimeState] = field(default_factory=dict)
    ecc: dict[tuple[str, str], float] = field(default_factory=dict)  # (device, event) -> cumulative
    vcpu_count: float | None = None
    vcpu_usage: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    reports: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def apply(self, report: Any) -> None:
        """Fold one report in; raises ReportError only when it is not an object at all."""
        if not isinstance(report, dict):
            raise ReportError("a neuron-monitor report must be a JSON object")
        with self.lock:
            self._instance(report.get("instance_info"))
            self._hardware(report.get("neuron_hardware_info"))
            self._runtimes(report.get("neuron_runtime_data"))
            self._system(report.get("system_data"))
            self.reports += 1

    def _instance(self, info: Any) -> None:
        if not isinstance(info, dict) or info.get("error"):
            return
        mapping = {
            "instance_name": "instance_name",
            "instance_id": "instance_id",
            "instance_type": "instance_type",
            "availability_zone": "instance_availability_zone",
            "region": "instance_region",
            "subnet_id": "subnet_id",
        }
        for label, key in mapping.items():
            value = info.get(key)
            self.instance[label] = value if isinstance(value, str) else ""

    def _hardware(self, info: Any) -> None:
        if not isinstance(info, dict) or info.get("error"):
            return
        devices, per_device = (
            _num(info.get("neuron_device_count")),
            _num(info.get("neuroncore_per_device_count")),
        )
        if devices is not None and per_device is not None:
            self.hardware = {
                "neuron_device_count": str(int(devices)),
                "neuroncore_per_device_count": str(int(per_device)),
            }

    def _runtimes(self, data: Any) -> None:
        if not isinstance(data, list):
            return
        if not data:
            self.runtimes.clear()  # nothing runs: AWS's exporter clears every runtime series
            return
        for entry in data:
            if not isinstance(entry, dict) or entry.get("error"):
                continue
            tag = entry.get("neuron_runtime_tag")
            tag = (
                str(tag)
                if isinstance(tag, str | int) and not isinstance(tag, bool)
                else str(entry.get("pid", ""))
            )
            state = self.runtimes.setdefault(tag, RuntimeState(tag))
            report = entry.get("report")
            if isinstance(report, dict):
                self._runtime_report(state, report)

    def _runtime_report(self, state: RuntimeState, report: dict[str, Any]) -> None:
        self._counters(state, _group(report, "neuroncore_counters"))
        self._stats(state, _group(report, "execution_stats", "inference_stats"))
        self._memory_used(state, _group(report, "memory_used"))
        vcpu = _group(report, "neuron_runtime_vcpu_usage")
        if vcpu and isinstance(vcpu.get("vcpu_usage"), dict):
            for usage in ("user", "system"):
                value = _num(vcpu["vcpu_usage"].get(usage))
                if value is not None:
                    state.vcpu[usage] = value / 100.0

    @staticmethod
    def _counters(state: RuntimeState, counters: dict[str, Any] | None) -> None:
        if not counters or not isinstance(counters.get("neuroncores_in_use"), dict):
            return
        for core, values in counters["neuroncores_in_use"].items():
            util = _num(values.get("neuroncore_utilization")) if isinstance(values, dict) else None
            if util is not None:
                state.core_utilization[str(core)] = util / 100.0

    def _stats(self, state: RuntimeState, stats: dict[str, Any] | None) -> None:
        if not stats:
            return
        self._add(state.errors, stats.get("error_summary"), ERROR_TYPES)
        self._add(state.status, stats.get("execution_summary", stats.get("inference_summary")), STATUS_TYPES)
        latency = stats.get("latency_stats")
        total = latency.get("total_latency") if isinstance(latency, dict) else None
        if isinstance(total, dict):  # null when nothing ran in the period
            for p in PERCENTILES:
                value = _num(total.get(p))
                if value is not None:
                    state.latency[p] = value

    @staticmethod
    def _memory_used(state: RuntimeState, memory: dict[str, Any] | None) -> None:
        used = memory.get("neuron_runtime_used_bytes") if memory else None
        if not isinstance(used, dict):
            return
        for location in ("host", "neuron_device"):
            value = _num(used.get(location))
            if value is not None:
                state.memory[location] = value
        breakdown = used.get("usage_breakdown")
        per_core = breakdown.get("neuroncore_memory_usage") if isinstance(breakdown, dict) else None
        if not isinstance(per_core, dict):
            return
        for core, values in per_core.items():
            if isinstance(values, dict):
                for kind in CORE_MEMORY_TYPES:
                    value = _num(values.get(kind))
                    if value is not None:
                        state.core_memory[(kind, str(core))] = value

    @staticmethod
    def _add(totals: dict[str, float], period: Any, keys: tuple[str, ...]) -> None:
        if not isinstance(period, dict):
            return
        for key in keys:
            value = _num(period.get(key))
            if value is not None and value >= 0:
                totals[key] = totals.get(key, 0.0) + value

    def _system(self, data: Any) -> None:
        if not isinstance(data, dict):
            return
        hw = _group(data, "neuron_hw_counters")
        if hw and isinstance(hw.get("neuron_devices"), list):
            for device in hw["neuron_devices"]:
                if not isinstance(device, dict) or _num(device.get("neuron_device_index")) is None:
                    continue
                index = str(int(device["neuron_device_index"]))
                for event in ECC_EVENTS:
                    value = _num(device.get(event))
                    if value is not None and value >= 0:
                        self.ecc[(index, event)] = self.ecc.get((index, event), 0.0) + value
        vcpu = _group(data, "vcpu_usage")
        if vcpu:
            if isinstance(vcpu.get("usage_data"), dict):
                self.vcpu_count = float(len(vcpu["usage_data"]))
            avg = vcpu.get("average_usage")
            if isinstance(avg, dict):
                parts = {
                    k: _num(avg.get(k)) or 0.0
                    for k in ("user", "nice", "system", "io_wait", "irq", "soft_irq")
                }
                user = parts["user"] + parts["nice"]
                system = parts["system"] + parts["io_wait"] + parts["irq"] + parts["soft_irq"]
                self.vcpu_usage = {"user": min(user, 100.0) / 100.0, "system": min(system, 100.0) / 100.0}
        memory = _group(data, "memory_info")
        if memory:
            for key in ("memory_total_bytes", "memory_used_bytes", "swap_total_bytes", "swap_used_bytes"):
                value = _num(memory.get(key))
                if value is not None:
                    self.memory[key] = value
