"""The Docker launcher: one container per server, an nginx container, the exporter, a private
network.

Every container is a pure function of the plan (:func:`container_specs`), so tests check the
exact containers an Inf2 or Inf1 host would get. Each server sees only its own devices,
remapped to ``/dev/neuron0..k``, with ``NEURON_RT_VISIBLE_CORES`` relative to them. Like the
local launcher, :func:`deploy` returns once every server is healthy and the endpoint and the
exporter answer, names the server and shows its log when one fails, and removes everything it
started when it does not get there. Cleanup removes only containers labelled with the
deployment's name.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from neuronserve.config import Settings, section_environment, settings_environment
from neuronserve.deploy.local import CRASH_LOOP_RESTARTS, DeployError, all_cores
from neuronserve.deploy.memory import MemoryPlan
from neuronserve.deploy.nginx import render_nginx_conf, server_access_log
from neuronserve.deploy.plan import PROBE_TIMEOUT_S, Plan, ServerPlan

LABEL = "neuronserve.deployment"
CONTAINER_PORT = 8080
EXPORTER_PORT = 9110
SECOND_NS = 1_000_000_000
STOP_LABEL = "neuronserve.stop-timeout-s"
DEFAULT_STOP_S = 10  # Docker's own
# Docker runs this in each server container; it prints /ready's body, which the deploy reads
# from the health log to tell a server that failed (its own verdict) from one still warming up.
READY_PROBE = (
    "import sys, urllib.error, urllib.request\n"
    "try:\n"
    f"    r = urllib.request.urlopen('http://127.0.0.1:{CONTAINER_PORT}/ready', timeout={PROBE_TIMEOUT_S})\n"
    "except urllib.error.HTTPError as e:\n"
    "    r = e\n"
    "print(r.read(2000).decode(errors='replace'))\n"
    "sys.exit(r.status != 200)\n"
)
MEMORY_HEADROOM = 1.5  # a server container's memory limit over its memory plan estimate
HEALTHCHECK_TIMEOUT_S = PROBE_TIMEOUT_S + 2  # also the serve images' HEALTHCHECK --timeout
ARTIFACTS_MOUNT = "/artifacts"
API_KEY_MOUNT = "/run/secrets/neuronserve-api-key"
NOT_SERVERS = frozenset({"nginx", "exporter"})  # roles (neuronserve.server labels) that serve no model
# On an engine deployment's nginx: its endpoint's probe is /health (the engines' own).
ENGINE_LABEL = "neuronserve.engine"


def relative_cores(server: ServerPlan, cores_per_device: int | None) -> str:
    """The server's cores as numbered inside its container (its first device becomes neuron0)."""
    if cores_per_device is None or not server.devices:
        return str(server.cores)
    offset = server.devices[0] * cores_per_device
    first, last = server.cores.ids[0] - offset, server.cores.ids[-1] - offset
    return str(first) if first == last else f"{first}-{last}"


def server_spec(
    settings: Settings, plan: Plan, server: ServerPlan, artifacts: dict[str, Path], image: str
) -> dict[str, Any]:
    """``artifacts``: each model's directory by name, model.*'s first (mounted at /artifacts,
    each further model's at /artifacts-<name>)."""
    name = f"{plan.deployment}-{server.name}"
    first, *further = artifacts.items()
    mounts = {str(first[1].resolve()): {"bind": ARTIFACTS_MOUNT, "mode": "ro"}}
    further_env: dict[str, str] = {}
    for model, directory in further:
        mounts[str(directory.resolve())] = {"bind": f"{ARTIFACTS_MOUNT}-{model}", "mode": "ro"}
        further_env[f"NEURONSERVE_MODELS__{model.upper()}__ARTIFACTS"] = f"{ARTIFACTS_MOUNT}-{model}"
    if settings.serve.api_key_file:  # the key file, mounted where the container reads it
        mounts[str(settings.path(settings.serve.api_key_file).resolve())] = {
            "bind": API_KEY_MOUNT,
            "mode": "ro",
        }
        further_env["NEURONSERVE_SERVE__API_KEY_FILE"] = API_KEY_MOUNT
    env = {
        # The deploy's effective settings, then what the plan decides for this container.
        **settings_environment(settings, "serve", "trace"),
        **further_env,
        "NEURONSERVE_SERVE__HOST": "0.0.0.0",  # noqa: S104 - inside the container, on the private network
        "NEURONSERVE_SERVE__PORT": str(CONTAINER_PORT),
        "NEURONSERVE_SERVE__CORES": relative_cores(server, plan.cores_per_device),
        "NEURONSERVE_SERVE__NAME": name,
        "NEURONSERVE_SERVE__MODELS_PER_SERVER": str(server.copies),
        "NEURONSERVE_SERVE__ARTIFACTS": ARTIFACTS_MOUNT,
        "NEURONSERVE_SERVE__MODE": "gunicorn",
        "NEURONSERVE_SERVE__ACCESS_LOG": server_access_log(settings),
        "HF_HUB_OFFLINE": "1",
    }
    spec: dict[str, Any] = {
        "name": name,
        "image": image,
        "command": ["neuronserve", "serve"],
        "environment": env,
        "volumes": mounts,
        "labels": {
            LABEL: plan.deployment,
            "neuronserve.server": server.name,
            "neuronserve.cores": str(server.cores),
        },
        "network": f"{plan.deployment}-net",
        "restart_policy": {"Name": "unless-stopped"},
        "user": "10001:10001",
        "security_opt": ["no-new-privileges"],
        "cap_drop": ["ALL"],
        "stop_signal": "SIGTERM",
        "stop_grace_period_s": int(settings.serve.drain_timeout_s) + 10,
        "healthcheck": {
            "test": ["CMD", "python", "-c", READY_PROBE],
            "interval": 5 * SECOND_NS,  # a Python process per probe: not more often
            # the probe's own wait, plus the start of a Python process on a busy host
            "timeout": HEALTHCHECK_TIMEOUT_S * SECOND_NS,
            "retries": 3,
            "start_period": int(settings.deploy.ready_timeout_s) * SECOND_NS,
        },
        "detach": True,
    }
    if not plan.backend.neuron_cores:
        spec["cpuset_cpus"] = str(server.cores)  # CPU ids are not renumbered inside a container
    else:
        spec["devices"] = [f"/dev/neuron{d}:/dev/neuron{i}:rwm" for i, d in enumerate(server.devices)]
    return spec


def nginx_spec(
    settings: Settings,
    plan: Plan,
    *,
    upstreams: list[str] | None = None,
    streams: bool = False,
    api_key: str = "",
    read_timeout_s: float | None = None,
) -> dict[str, Any]:
    """nginx in front of the servers (``upstreams``: other containers, e.g. engine copies, with
    ``streams`` and the ``api_key`` checked at the edge, as :func:`render_nginx_conf` says)."""
    if upstreams is None:
        upstreams = [f"{plan.deployment}-{s.name}" for s in plan.servers]
    if read_timeout_s is None:
        read_timeout_s = settings.serve.max_request_timeout_ms / 1000 + 5
    return {
        "name": f"{plan.deployment}-nginx",
        "image": settings.deploy.docker_nginx_image,
        "labels": {LABEL: plan.deployment, "neuronserve.server": "nginx"},
        "network": f"{plan.deployment}-net",
        "ports": {f"{CONTAINER_PORT}/tcp": (plan.host, plan.port)},
        "restart_policy": {"Name": "unless-stopped"},
        "detach": True,
        "nginx_conf": render_nginx_conf(
            listen_host="0.0.0.0",  # noqa: S104 - inside the container; published on deploy.host only
            listen_port=CONTAINER_PORT,
            upstreams=[f"{u}:{CONTAINER_PORT}" for u in upstreams],
            run_dir=None,
            max_body_bytes=settings.serve.max_body_bytes,
            read_timeout_s=read_timeout_s,
            max_conns=settings.deploy.max_conns_per_server,
            streams=streams,
            api_key=api_key,
        ),
    }


def exporter_spec(settings: Settings, plan: Plan, image: str) -> dict[str, Any]:
    """The metrics exporter, from the serving image (the Neuron DLCs bring neuron-monitor).

    On cpu it reports the host (``/proc`` is the host's) for the servers' CPUs; on Neuron it runs
    neuron-monitor, which sees the deployment's devices under their own numbers.
    """
    command = ["neuronserve", "monitor", "--backend", plan.backend.value]
    if not plan.backend.neuron_cores:
        command += ["--cpus", all_cores(plan)]
    spec: dict[str, Any] = {
        "name": f"{plan.deployment}-exporter",
        "image": image,
        "command": command,
        "environment": {
            **section_environment(settings, "monitor"),
            "NEURONSERVE_MONITOR__HOST": "0.0.0.0",  # noqa: S104 - inside the container; published on monitor.host only
            "NEURONSERVE_MONITOR__PORT": str(EXPORTER_PORT),
        },
        "labels": {LABEL: plan.deployment, "neuronserve.server": "exporter"},
        "network": f"{plan.deployment}-net",
        "ports": {f"{EXPORTER_PORT}/tcp": (settings.monitor.host, settings.monitor.port)},
        "restart_policy": {"Name": "unless-stopped"},
        "user": "10001:10001",
        "security_opt": ["no-new-privileges"],
        "cap_drop": ["ALL"],
        "stop_signal": "SIGTERM",
        "stop_grace_period_s": 10,
        # The serving image's HEALTHCHECK probes a server's /ready, which the exporter is not.
        "healthcheck": {"test": ["NONE"]},
        "detach": True,
    }
    devices = sorted({d for s in plan.servers for d in s.devices})
    if plan.backend.neuron_cores:
        spec["devices"] = [f"/dev/neuron{d}:/dev/neuron{d}:rwm" for d in devices]
    return spec


def memory_limit(estimate: int) -> int:
    """A server container's memory limit: its memory plan estimate with half again as headroom
    (load adds working sets the estimate counts once), in whole 256 MiB."""
    step = 256 << 20
    return -(-int(estimate * MEMORY_HEADROOM) // step) * step


def container_specs(
    settings: Settings,
    plan: Plan,
    artifacts: Path | dict[str, Path],
    memory: MemoryPlan | None = None,
) -> list[dict[str, Any]]:
    """Servers, then the exporter (when ``monitor.enabled``), then nginx. ``artifacts``: the
    directory of model.*'s artifacts, or every model's by name (model.*'s first). With the
    ``memory`` plan, each server container is limited to :func:`memory_limit` of its estimate."""
    if isinstance(artifacts, Path):
        artifacts = {settings.model_name: artifacts}
    image = settings.deploy.docker_image or f"neuronserve-serve-{plan.backend}:latest"
    exporter = [exporter_spec(settings, plan, image)] if settings.monitor.enabled else []
    servers = [server_spec(settings, plan, s, artifacts, image) for s in plan.servers]
    if memory is not None:
        estimates = {m.name: m.host for m in memory.servers}
        for spec, server in zip(servers, plan.servers, strict=True):
            if server.name in estimates:
                spec["mem_limit"] = memory_limit(estimates[server.name])
                spec["memswap_limit"] = spec["mem_limit"]  # no swap beyond it: a limit, not a slowdown
    return [*servers, *exporter, nginx_spec(settings, plan)]


def _duration(ns: int) -> str:
    return f"{ns // SECOND_NS}s"


def compose_document(specs: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """The same deployment as a compose file (JSON is valid YAML)."""
    services: dict[str, Any] = {}
    for spec in specs:
        service: dict[str, Any] = {
            "image": spec["image"],
            "container_name": spec["name"],
            "labels": spec["labels"],
            "restart": spec["restart_policy"]["Name"],
            "networks": [spec["network"]],
        }
        for key in ("command", "environment", "user", "security_opt", "cap_drop", "devices"):
            if key in spec:
                service[key] = spec[key]
        if "volumes" in spec:
            service["volumes"] = [f"{src}:{v['bind']}:{v['mode']}" for src, v in spec["volumes"].items()]
        if "stop_grace_period_s" in spec:
            service["stop_grace_period"] = f"{spec['stop_grace_period_s']}s"
        if "cpuset_cpus" in spec:
            service["cpuset"] = spec["cpuset_cpus"]
        if "mem_limit" in spec:
            service["mem_limit"] = spec["mem_limit"]
            service["memswap_limit"] = spec["memswap_limit"]
        if spec.get("healthcheck", {}).get("test") == ["NONE"]:
            service["healthcheck"] = {"disable": True}
        elif "healthcheck" in spec:
            check = spec["healthcheck"]
            service["healthcheck"] = {
                "test": check["test"],
                "interval": _duration(check["interval"]),
                "timeout": _duration(check["timeout"]),
                "retries": check["retries"],
                "start_period": _duration(check["start_period"]),
            }
        for inside, (host, port) in spec.get("ports", {}).items():
            service.setdefault("ports", []).append(f"{host}:{port}:{inside.split('/')[0]}")
        if "nginx_conf" in spec:
            service["configs"] = [{"source": "nginx_conf", "target": "/etc/nginx/nginx.conf"}]
        services[spec["name"]] = service
    nginx = next(s for s in specs if "nginx_conf" in s)
    return {
        "name": plan.deployment,
        "services": services,
        "networks": {f"{plan.deployment}-net": {"internal": False}},
        "configs": {"nginx_conf": {"content": nginx["nginx_conf"]}},
    }


def write_compose(path: Path, specs: list[dict[str, Any]], plan: Plan) -> None:
    path.write_text(json.dumps(compose_document(specs, plan), indent=2) + "\n")


def deploy(
    engine_client: Any,
    settings: Settings,
    plan: Plan,
    specs: list[dict[str, Any]],
    *,
    first_alone: bool = False,
    timeout_s: float | None = None,
) -> None:
    """Start the deployment and wait until it serves; on any failure remove what was started.

    ``first_alone``: the first container starts and gets healthy before the others start (a
    Neuron engine copy that compiles the graphs the others then load)."""
    if engine_client.containers.list(all=True, filters={"label": f"{LABEL}={plan.deployment}"}):
        raise DeployError(
            f"deployment {plan.deployment!r} is already running in Docker; run ./fast-api/cleanup.sh "
            "first, or set deploy.name"
        )
    _check_images(engine_client, specs)
    try:
        if first_alone:
            print(f"{specs[0]['name']} compiles the model first; the other copies start from its graphs")
            launch(engine_client, specs[:1], plan)
            wait_ready(engine_client, settings, plan, specs[:1], timeout_s=timeout_s)
            launch(engine_client, specs[1:], plan)
        else:
            launch(engine_client, specs, plan)
        wait_ready(engine_client, settings, plan, specs, timeout_s=timeout_s)
    except BaseException:
        cleanup(engine_client, plan.deployment, timeout_s=10)
        raise


def _check_images(engine_client: Any, specs: list[dict[str, Any]]) -> None:
    """Refuse before starting anything when an image is missing (the engine would otherwise try
    to pull ``neuronserve-serve-*`` from a registry that does not have it)."""
    from docker.errors import ImageNotFound

    for image in sorted({s["image"] for s in specs}):
        try:
            engine_client.images.get(image)
        except ImageNotFound:
            if image.startswith(("neuronserve-serve-", "neuronserve-engine-", "neuronserve-nginx:")):
                stage = image.split("-")[1].split(":")[0]
                hint = f"build it with: neuronserve image build {stage}"
            else:
                hint = f"pull it with: docker pull {image}"
            raise DeployError(f"image {image} is not on this Docker engine; {hint}") from None


def launch(engine_client: Any, specs: list[dict[str, Any]], plan: Plan) -> None:
    """Create the network and containers through the docker SDK."""
    import io
    import tarfile

    network = f"{plan.deployment}-net"
    if not engine_client.networks.list(names=[network]):
        engine_client.networks.create(network, labels={LABEL: plan.deployment})
    for spec in specs:
        kwargs = {k: v for k, v in spec.items() if k not in {"nginx_conf", "stop_grace_period_s"}}
        if "stop_grace_period_s" in spec:  # docker stop gives no container more than it asks for
            kwargs["labels"] = {**spec["labels"], STOP_LABEL: str(spec["stop_grace_period_s"])}
        if "nginx_conf" in spec:
            container = engine_client.containers.create(**{k: v for k, v in kwargs.items() if k != "detach"})
            data = spec["nginx_conf"].encode()
            archive = io.BytesIO()
            with tarfile.open(fileobj=archive, mode="w") as tar:
                info = tarfile.TarInfo("nginx.conf")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            container.put_archive("/etc/nginx", archive.getvalue())
            container.start()
        else:
            engine_client.containers.run(**kwargs)


def _local_url(host: str, port: int, path: str) -> str:
    """A published port as reached from this host (a wildcard bind is reached on loopback)."""
    reach = "127.0.0.1" if host in {"0.0.0.0", "", "::"} else host  # noqa: S104 - compared, not bound
    return f"http://{reach}:{port}{path}"


def wait_ready(
    engine_client: Any,
    settings: Settings,
    plan: Plan,
    specs: list[dict[str, Any]],
    *,
    poll_s: float = 0.5,
    timeout_s: float | None = None,
) -> None:
    """Wait until every server (or engine copy) container is healthy (Docker runs its health
    probe in it), then until the endpoint's /ready (an engine deployment's /health) and the
    exporter's /metrics answer through their published ports. A server that reports itself
    failed, or restarts ``CRASH_LOOP_RESTARTS`` times, or anything still pending after
    ``timeout_s`` (default ``deploy.ready_timeout_s``), fails the deploy naming it."""
    timeout_s = settings.deploy.ready_timeout_s if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    servers = [s["name"] for s in specs if s["labels"].get("neuronserve.server") not in NOT_SERVERS]
    pending: dict[str, str] = {}
    for spec in specs:
        if "nginx_conf" in spec:
            probe = "/health" if ENGINE_LABEL in spec["labels"] else "/ready"
            pending[spec["name"]] = _local_url(plan.host, plan.port, probe)
        elif spec["labels"].get("neuronserve.server") == "exporter":
            pending[spec["name"]] = _local_url(settings.monitor.host, settings.monitor.port, "/metrics")
    with httpx.Client(timeout=2) as client:
        while True:
            servers = [name for name in servers if not _healthy(engine_client.containers.get(name))]
            for name, url in list(pending.items()):
                if name.endswith("-nginx") and servers:
                    continue  # the endpoint last: it is ready when every server is
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        del pending[name]
            if not servers and not pending:
                return
            if time.monotonic() > deadline:
                first = servers[0] if servers else sorted(pending)[0]  # a server explains the most
                waiting = ", ".join(sorted([*servers, *pending]))
                raise DeployError(
                    _failure(
                        engine_client.containers.get(first),
                        f"not ready after {timeout_s:.0f}s (waiting for {waiting})",
                    )
                )
            time.sleep(poll_s)  # poll interval between readiness checks


def _healthy(container: Any) -> bool:
    """Whether a server container is healthy yet; raises when it will not get there.

    ``container`` comes from ``containers.get``, which inspects it: its attrs are current."""
    state = container.attrs.get("State", {})
    health = state.get("Health") or {}
    if health.get("Status") == "healthy":
        return True
    said = (health.get("Log") or [{}])[-1].get("Output", "")
    if '"failed"' in said:
        raise DeployError(_failure(container, f"failed while starting: {said.strip()[:500]}"))
    # Docker restarts an exited server (unless-stopped); one restart may be bad luck, more is a loop.
    if container.attrs.get("RestartCount", 0) >= CRASH_LOOP_RESTARTS or state.get("Status") == "dead":
        code = state.get("ExitCode")
        raise DeployError(_failure(container, f"keeps exiting while it starts (exit code {code})"))
    return False


def _failure(container: Any, reason: str) -> str:
    try:
        logs = container.logs(tail=20).decode(errors="replace").rstrip()
    except Exception as exc:  # the container may be gone; the reason still stands
        logs = f"(no log: {type(exc).__name__})"
    return f"{container.name}: {reason}\n--- last lines of docker logs {container.name} ---\n{logs}"


@dataclass(frozen=True)
class ContainerStatus:
    """One container of a Docker deployment, as ``neuronserve status`` shows it."""

    name: str
    role: str  # server-<i>, nginx or exporter (the neuronserve.server label)
    state: str  # Docker's: running, restarting, exited, ...
    health: str  # healthy, starting, unhealthy; "" for containers without a healthcheck
    cores: str
    restarts: int


def status(engine_client: Any, deployment: str) -> list[ContainerStatus]:
    """Every container of ``deployment``, inspected now, servers first."""
    from docker.errors import NotFound

    rows = []
    for listed in engine_client.containers.list(all=True, filters={"label": f"{LABEL}={deployment}"}):
        try:
            container = engine_client.containers.get(listed.name)  # an inspection: current state
        except NotFound:
            continue  # removed since it was listed
        state = container.attrs.get("State", {})
        rows.append(
            ContainerStatus(
                name=container.name,
                role=container.labels.get("neuronserve.server", ""),
                state=state.get("Status", "?"),
                health=(state.get("Health") or {}).get("Status", ""),
                cores=container.labels.get("neuronserve.cores", ""),
                restarts=int(container.attrs.get("RestartCount", 0)),
            )
        )
    order = {"nginx": 1, "exporter": 2}
    return sorted(rows, key=lambda r: (order.get(r.role, 0), r.role, r.name))


def cleanup(engine_client: Any, deployment: str, *, timeout_s: int | None = None) -> int:
    """Remove only this deployment's containers and network; returns how many containers.

    Each container gets its own stop timeout (servers: the drain timeout and then some) unless
    ``timeout_s`` says otherwise."""
    found = engine_client.containers.list(all=True, filters={"label": f"{LABEL}={deployment}"})
    for container in found:
        own = int(container.labels.get(STOP_LABEL, DEFAULT_STOP_S))
        container.stop(timeout=own if timeout_s is None else timeout_s)
        container.remove()
    for network in engine_client.networks.list(filters={"label": f"{LABEL}={deployment}"}):
        network.remove()
    return len(found)
