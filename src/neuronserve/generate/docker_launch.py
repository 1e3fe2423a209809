"""Engine copies in Docker (``deploy.launcher=docker``): one container per copy, behind an nginx
container, on the deployment's private network.

Each copy's container runs the engine image (:func:`~neuronserve.generate.engine.engine_image`)
with the same engine command as a local copy, listening on the private network instead of
loopback: on cpu its cores are its cpuset (and its OpenMP threads are bound to them); on Neuron
it sees only its own devices, remapped to ``/dev/neuron0..k``, with ``NEURON_RT_VISIBLE_CORES``
relative to them and the compiled graphs in a directory on the host that later starts reuse.
The model's files are mounted read-only. nginx passes streams through, retries another copy only
for a request that reached none and checks the API key; the copies publish no port. Docker's
health check asks each copy's ``/health`` (vLLM answers it once the model is loaded), and its
restart policy brings a dead copy back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from neuronserve.backends import CoreSet
from neuronserve.config import Settings
from neuronserve.deploy import docker
from neuronserve.deploy.plan import PROBE_TIMEOUT_S, ServerPlan
from neuronserve.generate.artifacts import GenerationManifest
from neuronserve.generate.engine import copy_command, engine_image
from neuronserve.generate.plan import CopyPlan, GenerationPlan

MODEL_MOUNT = "/model"
COMPILED_MOUNT = "/compiled"
UID = 10001  # a copy's user when deploy runs as root (never root inside)
HEALTH_PROBE = (
    "import sys, urllib.request\n"
    f"r = urllib.request.urlopen('http://127.0.0.1:{docker.CONTAINER_PORT}/health', timeout={PROBE_TIMEOUT_S})\n"
    "sys.exit(r.status != 200)\n"
)
# Shared memory for the engine's processes (Docker's default is 64 MB); Neuron images with
# tensor parallelism want more (FMBench gives them 12 GB).
SHM = {True: "12g", False: "1g"}
STOP_GRACE_S = 30  # the engine stops in seconds; its streams end with an error the client sees


def copy_user() -> tuple[int, int]:
    """The user a copy runs as: deploy's own, or :data:`UID` when deploy runs as root."""
    uid, gid = os.getuid(), os.getgid()
    return (UID, UID) if uid == 0 else (uid, gid)


def copy_spec(
    settings: Settings,
    plan: GenerationPlan,
    copy: CopyPlan,
    server: ServerPlan,
    manifest: GenerationManifest,
    *,
    user: tuple[int, int],
) -> dict[str, Any]:
    layout = plan.layout
    backend = layout.backend
    cores = CoreSet.parse(docker.relative_cores(server, layout.cores_per_device))
    command = copy_command(
        settings,
        backend,
        python="python3",
        model_dir=Path(MODEL_MOUNT),
        served_name=manifest.name,
        cores=cores,
        port=docker.CONTAINER_PORT,
        kv_gib=plan.kv_gib,
        compiled_dir=Path(COMPILED_MOUNT),
        host="0.0.0.0",  # noqa: S104 - inside the container, on the private network
        pin=False,
    )
    volumes = {str(manifest.model_dir.resolve()): {"bind": MODEL_MOUNT, "mode": "ro"}}
    if backend.neuron_cores:
        volumes[str(plan.compiled_dir.resolve())] = {"bind": COMPILED_MOUNT, "mode": "rw"}
    spec: dict[str, Any] = {
        "name": f"{layout.deployment}-{copy.name}",
        "image": engine_image(settings, backend),
        # The whole engine command: images differ in what their own entrypoint does.
        "entrypoint": list(command.argv),
        "environment": {**command.env, "HOME": "/tmp"},  # noqa: S108 - the container's own
        "volumes": volumes,
        "labels": {
            docker.LABEL: layout.deployment,
            "neuronserve.server": copy.name,
            "neuronserve.cores": copy.cores,
        },
        "network": f"{layout.deployment}-net",
        "restart_policy": {"Name": "unless-stopped"},
        "user": f"{user[0]}:{user[1]}",
        "security_opt": ["no-new-privileges"],
        "cap_drop": ["ALL"],
        "shm_size": SHM[backend.neuron_cores],
        "stop_signal": "SIGTERM",
        "stop_grace_period_s": STOP_GRACE_S,
        "healthcheck": {
            "test": ["CMD", "python3", "-c", HEALTH_PROBE],
            "interval": 5 * docker.SECOND_NS,
            "timeout": docker.HEALTHCHECK_TIMEOUT_S * docker.SECOND_NS,
            "retries": 3,
            "start_period": int(settings.generate.ready_timeout_s) * docker.SECOND_NS,
        },
        "detach": True,
    }
    if backend.neuron_cores:
        spec["devices"] = [f"/dev/neuron{d}:/dev/neuron{i}:rwm" for i, d in enumerate(server.devices)]
    else:
        spec["cpuset_cpus"] = str(server.cores)  # CPU ids are not renumbered inside a container
    return spec


def container_specs(
    settings: Settings, plan: GenerationPlan, manifest: GenerationManifest, user: tuple[int, int]
) -> list[dict[str, Any]]:
    """Every copy, then nginx."""
    copies = [
        copy_spec(settings, plan, copy, server, manifest, user=user)
        for copy, server in zip(plan.copies, plan.layout.servers, strict=True)
    ]
    nginx = docker.nginx_spec(
        settings,
        plan.layout,
        upstreams=[c["name"] for c in copies],
        streams=True,
        api_key=settings.api_key(),
        read_timeout_s=settings.generate.request_timeout_s,
    )
    nginx["labels"] = {**nginx["labels"], docker.ENGINE_LABEL: "vllm"}
    return [*copies, nginx]


def deploy(
    engine_client: Any,
    settings: Settings,
    plan: GenerationPlan,
    manifest: GenerationManifest,
    *,
    first_alone: bool,
) -> None:
    """Start the copies and nginx; returns once every copy is healthy and the endpoint answers."""
    user = copy_user()
    if plan.layout.backend.neuron_cores:  # the copies write their compiled graphs here
        plan.compiled_dir.mkdir(parents=True, exist_ok=True)
        if os.getuid() == 0:
            os.chown(plan.compiled_dir, *user)
    specs = container_specs(settings, plan, manifest, user)
    docker.deploy(
        engine_client,
        settings,
        plan.layout,
        specs,
        first_alone=first_alone,
        timeout_s=settings.generate.ready_timeout_s,
    )


def describe(spec: dict[str, Any]) -> str:
    """One copy's container as ``--dry-run`` prints it: where it runs, its environment, its command."""
    import shlex

    where = (
        f"cpuset {spec['cpuset_cpus']}" if "cpuset_cpus" in spec else f"devices {' '.join(spec['devices'])}"
    )
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(spec["environment"].items()))
    mounts = " ".join(f"{src}:{m['bind']}:{m['mode']}" for src, m in spec["volumes"].items())
    return (
        f"{spec['name']}: image {spec['image']}, {where}, mounts {mounts}\n"
        f"    {env} {shlex.join(spec['entrypoint'])}"
    )
