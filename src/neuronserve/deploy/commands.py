"""``neuronserve deploy | status | cleanup``: one deployment's lifecycle."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import httpx

from neuronserve.artifacts import ArtifactError, Manifest, artifacts_fingerprint, load_manifest, read_manifest
from neuronserve.backends import choose_backend, parse_kind
from neuronserve.config import Settings, find_config
from neuronserve.deploy import local
from neuronserve.deploy.inventory import detect
from neuronserve.deploy.local import DeployError
from neuronserve.deploy.memory import MemoryPlan, estimate
from neuronserve.deploy.plan import Plan, make_plan


def plan_for(
    settings: Settings, *, verify: bool = True, neuron_ls: Path | None = None, host_memory: int | None = None
) -> tuple[Plan, dict[str, Manifest], MemoryPlan]:
    """The plan, each model's manifest (by name) and their memory estimate for this host (or the
    host ``neuron_ls`` describes).

    ``verify`` checks every artifact against its manifest (a deployment refuses tampered or
    mismatched artifacts before anything starts); a dry run plans from the manifests alone.
    """
    from neuronserve.artifacts import artifacts_directory
    from neuronserve.models import is_hub_source

    manifests: dict[str, Manifest] = {}
    for name, model in settings.per_model().items():
        artifacts = artifacts_directory(model, choose_backend(model.trace.backend)[0])
        if not (artifacts / "manifest.json").is_file():
            raise DeployError(f"no artifacts for model {name} in {artifacts}; run ./trace-model/run.sh first")
        manifest = load_manifest(artifacts) if verify else read_manifest(artifacts)
        # A directory named by serve.artifacts defines its model; traced ones must be what the
        # config says now (a stale trace of another task would answer the wrong routes).
        given = name == settings.model_name and settings.serve.artifacts
        if not given and manifest.task != model.model.task:
            raise DeployError(
                f"model {name}: the artifacts in {artifacts} are a {manifest.task} model but its task "
                f"is {model.model.task}; trace again (./trace-model/run.sh)"
            )
        # A hub model is its id at a revision: a changed one needs a new trace. (A directory's
        # path may differ between the trace's container and this host; its task is checked above.)
        traced = (str(manifest.model.get("source", "")), str(manifest.model.get("revision", "")))
        wanted = (model.model.source, model.model.revision)
        if not given and traced != wanted and (is_hub_source(traced[0]) or is_hub_source(wanted[0])):
            raise DeployError(
                f"model {name}: the artifacts in {artifacts} were traced from {_at(*traced)} but "
                f"model.source/model.revision say {_at(*wanted)}; trace again (./trace-model/run.sh)"
            )
        manifests[name] = manifest
    backends = {m.backend for m in manifests.values()}
    if len(backends) > 1:
        raise DeployError(
            f"the models are traced for different backends ({', '.join(sorted(backends))}); "
            "trace them all for one (trace.backend)"
        )
    backend = backends.pop()
    inventory = detect(backend, neuron_ls=neuron_ls, host_memory=host_memory)
    plan = make_plan(settings, inventory, backend)
    shared = settings.serve.neuron_shared_weights
    memory = estimate(plan, list(manifests.values()), inventory, shared_weights=shared)
    return plan, manifests, memory


def _at(source: str, revision: str) -> str:
    return source + (f"@{revision}" if revision else "")


def verified(settings: Settings, manifests: dict[str, Manifest]) -> Settings:
    """``settings`` with each model's fingerprint (and each further model's directory) set:
    plan_for hashed every artifact, so servers whose files are unchanged since skip doing it again."""
    first, *_ = manifests.values()
    serve = dataclasses.replace(settings.serve, artifacts_fingerprint=artifacts_fingerprint(first))
    extras = tuple(
        dataclasses.replace(
            m,
            artifacts=str(manifests[m.name].directory),
            artifacts_fingerprint=artifacts_fingerprint(manifests[m.name]),
        )
        for m in settings.extra_models
    )
    return dataclasses.replace(settings, serve=serve, extra_models=extras)


def deploy(
    settings: Settings,
    config: str | None,
    *,
    dry_run: bool,
    emit_compose: str | None,
    neuron_ls: Path | None = None,
    host_memory: int | None = None,
) -> int:
    plan, manifests, memory = plan_for(
        settings, verify=not dry_run, neuron_ls=neuron_ls, host_memory=host_memory
    )
    print(plan.table())
    print(memory.table())
    memory.check()  # a plan that does not fit is refused before anything starts
    if emit_compose:  # run elsewhere or later: its servers hash the artifacts themselves
        from neuronserve.deploy import docker

        specs = docker.container_specs(settings, plan, _directories(manifests), memory)
        docker.write_compose(Path(emit_compose), specs, plan)
        print(f"wrote {emit_compose}")
        return 0
    if dry_run:
        return 0
    settings = verified(settings, manifests)
    config_path = find_config(config, os.environ)
    config_abs = config_path.resolve() if config_path is not None else None
    if settings.deploy.launcher == "docker":
        return _deploy_docker(settings, plan, _directories(manifests), memory)
    rd = local.start(settings, plan, next(iter(manifests.values())).directory, config_abs)
    try:
        local.wait_ready(settings, plan, rd)
    except BaseException:
        local.stop(rd)
        raise
    print(f"ready: http://{plan.host}:{plan.port} ({len(plan.servers)} servers; logs in {rd.path / 'logs'})")
    m = settings.monitor
    if m.enabled:
        print(f"metrics: exporter http://{m.host}:{m.port}/metrics, servers http://127.0.0.1:<port>/metrics")
    if m.prometheus:
        print(
            f"prometheus: http://127.0.0.1:{m.prometheus_port} (targets in {rd.path / 'prometheus' / 'targets'})"
        )
    return 0


def emit_k8s(settings: Settings, directory: Path) -> int:
    """Write the Kustomize base for ``settings`` into ``directory`` (see deploy.k8s)."""
    from neuronserve.artifacts import artifacts_directory
    from neuronserve.deploy import k8s
    from neuronserve.models import BUNDLED_PREFIX, is_local_source

    if settings.trace.backend == "auto":
        raise DeployError(
            "the k8s launcher plans for the cluster's nodes, not this host: set trace.backend "
            "(neuronx for inf2/trn1, neuron for inf1, cpu)"
        )
    name = settings.deploy.name
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", name):
        raise DeployError(
            f"deploy.name {name!r} names Kubernetes objects: use lower-case letters, digits and '-', "
            "starting with a letter (at most 40)"
        )
    backend, why = parse_kind(settings.trace.backend), f"trace.backend={settings.trace.backend}"
    if settings.model.task.generates:
        from neuronserve.generate.launch import emit_k8s as emit_generation

        return emit_generation(settings, backend, directory)
    plan = k8s.pod_plan(settings, backend)
    local_sources = [
        f"{model_name} ({m.model.source})"
        for model_name, m in settings.per_model().items()
        if is_local_source(m.model.source)
    ]
    if local_sources:
        print(
            "note: the trace Job runs in the cluster, where these local model directories are not: "
            f"{', '.join(local_sources)}; bake them into the image or mount them in an overlay, or "
            "use hub ids"
        )
    bundled = [n for n, m in settings.per_model().items() if m.model.source.startswith(BUNDLED_PREFIX)]
    if bundled:
        print(
            f"note: {', '.join(bundled)} is the bundled demo model: the trace Job needs it in the serve "
            "image (build it with --build-arg EXTRAS=serve,trace,bundled, and onnx on cpu)"
        )
    copies = ", ".join(f"{name} x{c}" for name, c in plan.model_copies)
    print(
        f"backend {backend} ({why}); each pod is one server of {len(plan.servers[0].cores)} "
        f"core(s) holding {copies}; {settings.deploy.k8s_replicas} pod(s), autoscaled up to "
        f"{settings.deploy.k8s_max_replicas} ({settings.deploy.k8s_autoscaler})"
    )
    host_bytes = None
    try:
        manifests = [read_manifest(artifacts_directory(m, backend)) for m in settings.per_model().values()]
    except (OSError, ValueError, ArtifactError):
        manifests = []
    if manifests and {m.backend for m in manifests} == {backend}:
        memory = estimate(
            plan,
            manifests,
            k8s.pod_inventory(settings, backend),
            shared_weights=settings.serve.neuron_shared_weights,
        )
        print(memory.table())
        host_bytes = memory.servers[0].host
    elif not settings.deploy.k8s_memory:
        print(
            f"no {backend} artifacts here to estimate memory from: each pod asks for "
            f"{k8s.DEFAULT_MEMORY >> 30}Gi (set deploy.k8s_memory to choose)"
        )
    files = k8s.write_base(settings, backend, directory, host_bytes)
    print(f"wrote {len(files)} files to {directory}")
    print(f"check: neuronserve k8s check {directory}; deploy: kubectl apply -k {directory}")
    return 0


def _directories(manifests: dict[str, Manifest]) -> dict[str, Path]:
    return {name: m.directory for name, m in manifests.items()}


def _deploy_docker(settings: Settings, plan: Plan, artifacts: dict[str, Path], memory: MemoryPlan) -> int:
    from neuronserve import containers
    from neuronserve.deploy import docker

    engine = containers.docker_engine()
    if engine.client is None:
        raise DeployError(f"{engine.reason}; start Docker, or use deploy.launcher=local")
    specs = docker.container_specs(settings, plan, artifacts, memory)
    docker.deploy(engine.client, settings, plan, specs)
    print(
        f"ready: http://{plan.host}:{plan.port} ({len(plan.servers)} server containers; docker logs <name>)"
    )
    if settings.monitor.enabled:
        print(f"metrics: exporter http://{settings.monitor.host}:{settings.monitor.port}/metrics")
    if settings.monitor.prometheus:
        print(
            "prometheus: not started by the Docker launcher; docker compose -f monitor/docker-compose.yml up -d"
        )
    return 0


def status(settings: Settings) -> int:
    """Print each server's (or engine copy's) state, readiness, cores, port and restarts; 3 when
    nothing runs."""
    if settings.deploy.launcher == "docker":
        return _docker_status(settings)
    rd = local.run_dir(settings)
    if local.supervisord_pid(rd) is None:
        print(f"deployment {settings.deploy.name!r} is not running")
        return 3
    import json

    plan = json.loads(rd.plan.read_text())
    programs, engines = local.served_programs(rd.path)
    probe = "/v1/models" if engines else "/ready"
    processes = {p["name"]: p for p in local.Supervisor(rd).processes()}
    restarts = local.restarts(rd)
    print(
        f"{'program':<12}{'state':<10}{'ready':<8}{'cores':<8}{'port':<7}{'pid':<9}restarts"
        + ("" if engines else " (worker)")
    )
    with httpx.Client(timeout=2) as client:
        for program in programs:
            name, cores, port = program["name"], program["cores"], program["port"]
            info = processes.get(name, {})
            try:
                ready = "yes" if client.get(f"http://127.0.0.1:{port}{probe}").status_code == 200 else "no"
            except httpx.HTTPError:
                ready = "down"
            worker = "" if engines else f" ({local.worker_restarts(rd, name)})"
            print(
                f"{name:<12}{info.get('statename', '?'):<10}{ready:<8}{cores:<8}"
                f"{port:<7}{info.get('pid', 0):<9}{restarts.get(name, 0)}{worker}"
            )
        nginx = processes.get("nginx", {})
        print(
            f"{'nginx':<12}{nginx.get('statename', '?'):<10}{'':<8}{'':<8}{plan['port']:<7}{nginx.get('pid', 0):<9}{restarts.get('nginx', 0)}"
        )
    print(f"endpoint http://{plan['host']}:{plan['port']}" + ("/v1" if engines else ""))
    return 0


def _docker_status(settings: Settings) -> int:
    from neuronserve import containers
    from neuronserve.deploy import docker

    engine = containers.docker_engine()
    if engine.client is None:
        raise DeployError(f"{engine.reason}; the status of a Docker deployment needs its engine")
    name = settings.deploy.name
    rows = docker.status(engine.client, name)
    if not rows:
        print(f"deployment {name!r} is not running in Docker")
        return 3
    # health: the engine's own verdict from the health check (a server's /ready), "-" where there is none
    print(f"{'container':<28}{'state':<12}{'health':<11}{'cores':<8}restarts")
    for row in rows:
        print(f"{row.name:<28}{row.state:<12}{row.health or '-':<11}{row.cores:<8}{row.restarts}")
    d = settings.deploy
    endpoint = f"http://{'127.0.0.1' if d.host in {'0.0.0.0', '::'} else d.host}:{d.port}"  # noqa: S104
    try:
        probe = "/health" if settings.model.task.generates else "/ready"  # engine copies: theirs
        answer = httpx.get(f"{endpoint}{probe}", timeout=2).status_code
        said = "ready" if answer == 200 else f"not ready ({answer})"
    except httpx.HTTPError:
        said = "not answering"
    print(f"endpoint {endpoint} ({said})")
    return 0


def cleanup(settings: Settings) -> int:
    if settings.deploy.launcher == "docker":
        from neuronserve import containers
        from neuronserve.deploy import docker

        engine = containers.docker_engine()
        if engine.client is None:
            raise DeployError(f"{engine.reason}; nothing to clean up without an engine")
        removed = docker.cleanup(engine.client, settings.deploy.name)
        print(f"removed {removed} containers of deployment {settings.deploy.name!r}")
        return 0
    rd = local.run_dir(settings)
    if local.stop(rd):
        print(f"stopped deployment {settings.deploy.name!r} and removed {rd.path}")
    else:
        print(f"deployment {settings.deploy.name!r} is not running; nothing to clean up")
    return 0
