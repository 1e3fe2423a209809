"""The plan: which contiguous cores, devices, port and copies each server gets."""

from __future__ import annotations

from dataclasses import dataclass

from neuronserve.backends import BackendKind, CoreSet
from neuronserve.config import ConfigError, Settings
from neuronserve.deploy.inventory import Inventory

# How long a probe of /health or /ready may take before Kubernetes (timeoutSeconds) or Docker's
# HEALTHCHECK counts it failed. Probes are answered before any inference work, and under a burst
# of 1000 req/s bench/probes_under_load.py measures ~0.1-0.25 s at most on a 2-core host: this
# is far above that, so only a real stall fails a probe (Kubernetes' own default is 1 s).
PROBE_TIMEOUT_S = 5


@dataclass(frozen=True)
class ServerPlan:
    index: int
    name: str
    cores: CoreSet
    devices: tuple[int, ...]
    port: int
    copies: int


@dataclass(frozen=True)
class Plan:
    deployment: str
    backend: BackendKind
    host: str
    port: int
    servers: tuple[ServerPlan, ...]
    cores_per_device: int | None
    idle_cores: tuple[int, ...]
    # (model name, copies in each server), model.*'s first; every server holds every model.
    model_copies: tuple[tuple[str, int], ...] = ()
    # cpu, local: the CPUs the servers lend each other through a host-wide core ledger (None: each
    # runs on its own only).
    shared_cores: CoreSet | None = None

    def table(self) -> str:
        """The plan as a text table, for --dry-run and after deploy."""
        rows = [f"{'server':<12}{'cores':<10}{'devices':<12}{'port':<8}copies"]
        several = len(self.model_copies) > 1
        for s in self.servers:
            devices = ",".join(str(d) for d in s.devices) or "-"
            copies = " ".join(f"{n}:{c}" for n, c in self.model_copies) if several else str(s.copies)
            rows.append(f"{s.name:<12}{s.cores!s:<10}{devices:<12}{s.port:<8}{copies}")
        idle = f"; idle cores: {CoreSet(self.idle_cores)}" if self.idle_cores else ""
        rows.append(
            f"endpoint http://{self.host}:{self.port}  backend {self.backend}  {len(self.servers)} servers{idle}"
        )
        if self.shared_cores is not None:
            rows.append(
                f"cores {self.shared_cores} lent between the servers: a batch running alone borrows the "
                "others' idle cores (deploy.lend_cores)"
            )
        return "\n".join(rows)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _say_list(items: list[int]) -> str:
    words = [str(i) for i in items]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def chosen_cores(settings: Settings, inventory: Inventory) -> tuple[int, ...]:
    d = settings.deploy
    if not d.cores:
        return inventory.cores
    try:
        chosen = CoreSet.parse(d.cores).ids
    except ValueError as exc:
        raise ConfigError(f"deploy.cores {exc}") from None
    missing = [c for c in chosen if c not in inventory.cores]
    if missing:
        raise ConfigError(
            f"deploy.cores {d.cores}: cores {missing} are not on this host (it has {CoreSet(inventory.cores)})"
        )
    return chosen


# cpu: the most CPUs one server owns by default. Its event loop feeds every copy, at ~250 us of
# CPU per single-text request (bench/host_overhead.py), which keeps this many single-core copies
# of a small encoder busy; a larger host gets several servers behind nginx.
CPU_CORES_PER_SERVER = 8


def cores_per_server(settings: Settings, backend: BackendKind, total: int | None) -> int:
    """``deploy.cores_per_server``, or by backend when it is 0: 1 NeuronCore on Neuron; on cpu
    the largest even share of the ``total`` CPUs up to half of them and CPU_CORES_PER_SERVER, so
    a host of two or more CPUs has at least two servers (one dying loses no request; they lend
    each other idle CPUs, deploy.lend_cores); 1 where the total is unknown (a pod)."""
    configured = settings.deploy.cores_per_server
    if configured or backend.neuron_cores or total is None:
        return configured or 1
    return max(d for d in _divisors(total) if d <= max(1, min(CPU_CORES_PER_SERVER, total // 2)))


def _layout(settings: Settings, total: int, backend: BackendKind) -> tuple[int, int]:
    """(cores per server, number of servers) for ``total`` cores."""
    d = settings.deploy
    if d.servers == "auto":
        return total, 1
    per_server = cores_per_server(settings, backend, total)
    if per_server > total:
        raise ConfigError(f"deploy.cores_per_server {per_server} exceeds the {total} cores available")
    fits = total // per_server
    if d.servers == "max":
        if total % per_server:
            raise ConfigError(
                f"{total} cores / cores_per_server {per_server} leaves {total % per_server} idle: use "
                f"{_say_list(_divisors(total))} (or deploy.servers=N to leave cores idle on purpose)"
            )
        return per_server, fits
    count = int(d.servers)
    if count > fits:
        raise ConfigError(
            f"deploy.servers={count} needs {count * per_server} cores but {total} are available; "
            f"at most {fits} servers of {per_server} cores fit"
        )
    return per_server, count


def make_plan(settings: Settings, inventory: Inventory, backend: BackendKind) -> Plan:
    """Contiguous core ranges per server; errors say what would fit."""
    d = settings.deploy
    chosen = chosen_cores(settings, inventory)
    per_server, count = _layout(settings, len(chosen), backend)
    lend = backend.lends_cores and d.lend_cores and d.launcher == "local" and count > 1
    servers = []
    for i in range(count):
        ids = tuple(chosen[i * per_server : (i + 1) * per_server])
        if backend.neuron_cores and ids != tuple(range(ids[0], ids[0] + len(ids))):
            raise ConfigError(
                f"server {i} would own cores {ids}, which are not contiguous; deploy.cores must be a range"
            )
        port = d.base_port + i
        if port == d.port:
            raise ConfigError(f"server {i} port {port} collides with deploy.port; move deploy.base_port")
        servers.append(
            ServerPlan(
                index=i,
                name=f"server-{i}",
                cores=CoreSet(ids),
                devices=inventory.devices_for(ids),
                port=port,
                copies=backend.copies_per_server(settings.serve.models_per_server, per_server),
            )
        )
    model_copies = tuple(
        (name, backend.copies_per_server(model.serve.models_per_server, per_server))
        for name, model in settings.per_model().items()
    )
    used = {c for s in servers for c in s.cores.ids}
    return Plan(
        deployment=d.name,
        backend=backend,
        host=d.host,
        port=d.port,
        servers=tuple(servers),
        cores_per_device=inventory.cores_per_device,
        idle_cores=tuple(c for c in chosen if c not in used),
        model_copies=model_copies,
        shared_cores=CoreSet(tuple(sorted(used))) if lend else None,
    )
