"""``neuronserve monitor``: start the sources, serve the registry over HTTP, run until stopped."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterable

from prometheus_client import start_http_server

from neuronserve.backends import BackendKind
from neuronserve.config import ConfigError, Settings
from neuronserve.monitor.exporter import (
    ExporterState,
    SourceHealth,
    build_registry,
    neuron_lines,
    pump,
    sample_host,
    supervise,
)
from neuronserve.monitor.host import HostSampler, Servers, no_servers

log = logging.getLogger(__name__)
SOURCES = ("neuron-monitor", "stdin", "replay", "host")


def resolve_sources(settings: Settings, backend: BackendKind) -> list[str]:
    m = settings.monitor
    if m.sources == "auto":
        return [backend.monitor_source]
    chosen = [s.strip() for s in m.sources.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SOURCES]
    if unknown or not chosen:
        raise ConfigError(f"monitor.sources {m.sources!r}: use auto or a list of {', '.join(SOURCES)}")
    if sum(s in {"neuron-monitor", "stdin", "replay"} for s in chosen) > 1:
        raise ConfigError(
            "monitor.sources: choose one of neuron-monitor, stdin or replay (they feed the same state)"
        )
    if "replay" in chosen and not m.replay_file:
        raise ConfigError("monitor.sources includes replay: set monitor.replay_file to a JSON-lines file")
    return chosen


def start(
    settings: Settings, sources: list[str], *, cpus: list[int] | None, servers: Servers = no_servers
) -> tuple[ExporterState, threading.Event]:
    """Start one daemon thread per source; returns the shared state and a stop event."""
    m = settings.monitor
    state = ExporterState()
    stop = threading.Event()
    for name in sources:
        health = SourceHealth(name, m.period_s)
        state.sources[name] = health
        if name == "host":
            sampler = HostSampler(state.host, cpus, servers)
            target = threading.Thread(
                target=sample_host, args=(sampler, health, stop), daemon=True, name="host"
            )
        elif name == "stdin":  # a pipe that ended cannot be opened again
            lines = neuron_lines(name, period_s=m.period_s, replay_file="", neuron_monitor="")
            target = threading.Thread(target=pump, args=(state, health, lines), daemon=True, name=name)
        else:

            def open_lines(source: str = name) -> Iterable[str]:
                return neuron_lines(
                    source,
                    period_s=m.period_s,
                    replay_file=str(settings.path(m.replay_file)),
                    neuron_monitor=m.neuron_monitor,
                )

            target = threading.Thread(
                target=supervise, args=(state, health, open_lines, stop), daemon=True, name=name
            )
        target.start()
    return state, stop


def serve(
    settings: Settings, sources: list[str], *, cpus: list[int] | None, servers: Servers = no_servers
) -> int:
    state, stop = start(settings, sources, cpus=cpus, servers=servers)
    server, thread = start_http_server(
        settings.monitor.port, addr=settings.monitor.host, registry=build_registry(state)
    )
    log.info(
        "exporter on http://%s:%d/metrics, sources: %s",
        settings.monitor.host,
        settings.monitor.port,
        ", ".join(sources),
    )
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            time.sleep(0)
    except KeyboardInterrupt:
        pass
    server.shutdown()
    thread.join(timeout=5)
    return 0
