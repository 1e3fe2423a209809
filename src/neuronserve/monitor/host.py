"""Host metrics for cpu deployments: per-CPU utilization, memory, per-server CPU and RSS."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil


@dataclass
class HostState:
    """The latest host sample (gauges only)."""

    cpu_utilization: dict[str, float] = field(default_factory=dict)  # cpu -> ratio
    vcpu_count: float = 0.0
    vcpu_usage: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    server_cpu: dict[str, float] = field(default_factory=dict)  # server -> cores' worth of CPU (ratio of one)
    server_rss: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


Servers = Callable[[], dict[str, int]]  # server name -> main pid, asked at every sample


def no_servers() -> dict[str, int]:
    return {}


class HostSampler:
    """Samples the host every period; ``cpus`` narrows per-CPU figures to the deployment's cores;
    ``servers`` names the deployment's server processes (the launcher knows them: see
    ``deploy.local.deployment_servers``)."""

    def __init__(self, state: HostState, cpus: list[int] | None, servers: Servers = no_servers) -> None:
        self.state = state
        self.cpus = cpus
        self.servers = servers
        self._procs: dict[int, psutil.Process] = {}
        psutil.cpu_percent(percpu=True)  # the first call only sets the baseline

    def _process(self, pid: int) -> psutil.Process:
        if pid not in self._procs:
            self._procs[pid] = psutil.Process(pid)
            self._procs[pid].cpu_percent()
        return self._procs[pid]

    def sample(self) -> None:
        per_cpu = psutil.cpu_percent(percpu=True)
        times = psutil.cpu_times_percent()
        vm, swap = psutil.virtual_memory(), psutil.swap_memory()
        wanted = self.cpus if self.cpus is not None else list(range(len(per_cpu)))
        server_cpu: dict[str, float] = {}
        server_rss: dict[str, float] = {}
        for name, pid in self.servers().items():
            try:
                main = self._process(pid)
                family = [main, *(self._process(c.pid) for c in main.children(recursive=True))]
                server_cpu[name] = sum(p.cpu_percent() for p in family) / 100.0
                server_rss[name] = float(sum(p.memory_info().rss for p in family))
            except psutil.Error:
                continue
        user = getattr(times, "user", 0.0) + getattr(times, "nice", 0.0)
        system = sum(getattr(times, k, 0.0) for k in ("system", "iowait", "irq", "softirq"))
        with self.state.lock:
            self.state.cpu_utilization = {str(c): per_cpu[c] / 100.0 for c in wanted if c < len(per_cpu)}
            self.state.vcpu_count = float(len(per_cpu))
            self.state.vcpu_usage = {"user": min(user, 100.0) / 100.0, "system": min(system, 100.0) / 100.0}
            self.state.memory = {
                "memory_total_bytes": float(vm.total),
                "memory_used_bytes": float(vm.total - vm.available),
                "swap_total_bytes": float(swap.total),
                "swap_used_bytes": float(swap.used),
            }
            self.state.server_cpu = server_cpu
            self.state.server_rss = server_rss
            self.state.samples += 1
