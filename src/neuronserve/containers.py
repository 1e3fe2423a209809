"""Docker for the trace stage: build ``docker/trace-<backend>.Dockerfile`` and run it.

Every decision is a pure function of settings and host facts (:func:`trace_container_spec`), so
tests check the exact container a Neuron host would get; only :func:`docker_engine` talks to an
engine. Without a reachable engine the callers fall back to the local environment and say so.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuronserve.backends import BackendKind

CONTAINER_WORKDIR = "/workspace"
CONTAINER_OUTPUT = "/workspace/trace-models"
CONTAINER_MODEL = "/workspace/model"
CONTAINER_HUB_CACHE = "/tmp/hf-hub"  # noqa: S108 - read-only mounts of the host's Hugging Face cache


@dataclass(frozen=True)
class Engine:
    """A reachable Docker engine, or why there is none."""

    client: Any | None
    reason: str


def docker_engine(timeout_s: float = 3.0) -> Engine:
    """Connect to the Docker engine if one answers a ping within ``timeout_s``."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and not Path(host[len("unix://") :]).exists():
        return Engine(None, f"no Docker engine reachable (no socket at {host})")
    try:
        from docker.client import DockerClient
    except ModuleNotFoundError:
        return Engine(None, "the Docker SDK is not installed (pip install 'neuronserve[deploy]')")
    client = None
    try:
        # An explicit API version skips the SDK's version probe, which leaks its socket on failure.
        client = DockerClient(base_url=host, version="1.41", timeout=int(max(1, timeout_s)))
        client.ping()
    except Exception as exc:
        if client is not None:
            client.close()
        return Engine(None, f"no Docker engine reachable at {host} ({type(exc).__name__})")
    return Engine(client, f"Docker engine reachable at {host}")


def image_tag(stage: str, backend: BackendKind) -> str:
    return f"neuronserve-{stage}-{backend}:latest"


def dockerfile(repo: Path, stage: str, backend: BackendKind) -> Path:
    return repo / "docker" / f"{stage}-{backend}.Dockerfile"


def neuron_devices() -> list[str]:
    return sorted(glob.glob("/dev/neuron[0-9]*"))


def trace_container_spec(
    *,
    backend: BackendKind,
    repo: Path,
    config_path: Path,
    output_dir: Path,
    devices: list[str],
    uid: int,
    gid: int,
    model_dirs: Mapping[str, tuple[str, Path]] | None = None,
    hub_repos: Sequence[Path] = (),
    force: bool = False,
    environment: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``client.containers.run`` that trace inside the image.

    The config is mounted read-only at the path the container reads; the output directory is
    the only writable mount; Neuron devices are passed through unchanged (tracing may use any
    core); the process runs as the calling user so the artifacts belong to them.
    """
    command = [
        "neuronserve",
        "trace",
        "--runner",
        "local",
        "--quiet",
        "--config",
        f"{CONTAINER_WORKDIR}/config.properties",
        "--set",
        f"trace.output_dir={CONTAINER_OUTPUT}",
        "--set",
        f"trace.backend={backend}",
    ]
    volumes = {
        str(config_path.resolve()): {"bind": f"{CONTAINER_WORKDIR}/config.properties", "mode": "ro"},
        str(output_dir.resolve()): {"bind": CONTAINER_OUTPUT, "mode": "rw"},
    }
    # Models given as local directories (``model_dirs``: the key before ``.source``, "model" or
    # "models.<name>", to the model's name and directory) are mounted read-only; bundled models
    # are in the image. The name is kept: derived from the mount point it would change.
    for prefix, (name, model_dir) in (model_dirs or {}).items():
        bind = CONTAINER_MODEL if prefix == "model" else f"{CONTAINER_MODEL}-{name}"
        volumes[str(model_dir.resolve())] = {"bind": bind, "mode": "ro"}
        command += [
            "--set",
            f"{prefix}.source={bind}",
            *(["--set", f"model.name={name}"] if prefix == "model" else []),
        ]
    # Hub models keep their id and revision (the manifest records them): the container resolves
    # them offline from their cache directories (models--org--name), mounted whole, as a
    # snapshot's files are links into the directory's blobs.
    for hub_repo in hub_repos:
        volumes[str(hub_repo.resolve())] = {"bind": f"{CONTAINER_HUB_CACHE}/{hub_repo.name}", "mode": "ro"}
    if force:
        command.append("--force")
    spec: dict[str, Any] = {
        "image": image_tag("trace", backend),
        "command": command,
        "user": f"{uid}:{gid}",
        "working_dir": CONTAINER_WORKDIR,
        # The caller's effective settings (environment and --set included) beside the mounted file.
        "environment": {
            **(environment or {}),
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_CACHE": CONTAINER_HUB_CACHE,
            "HOME": "/tmp",  # noqa: S108 - a writable HOME for a non-root uid
        },
        "volumes": volumes,
        "labels": {"neuronserve.stage": "trace", "neuronserve.repo": str(repo.resolve())},
        "remove": True,
        "detach": False,
        "stdout": True,
        "stderr": True,
    }
    if backend.neuron_cores:
        if not devices:
            raise RuntimeError(f"backend {backend} needs /dev/neuron* devices and this host has none")
        spec["devices"] = [f"{d}:{d}:rwm" for d in devices]
    return spec


def build_image(engine: Engine, repo: Path, stage: str, backend: BackendKind) -> str:
    """Build the ``stage`` (trace, serve or engine) image for ``backend``; returns its tag."""
    assert engine.client is not None, "this is a bug: build_image needs an engine"
    tag = image_tag(stage, backend)
    engine.client.images.build(
        path=str(repo),
        dockerfile=str(dockerfile(repo, stage, backend).relative_to(repo)),
        tag=tag,
        rm=True,
    )
    return tag


def run_trace_container(engine: Engine, spec: dict[str, Any]) -> str:
    """Run the trace container to completion; returns its output."""
    assert engine.client is not None, "this is a bug: run_trace_container needs an engine"
    output = engine.client.containers.run(**spec)
    return output.decode(errors="replace") if isinstance(output, bytes) else str(output)


def current_ids() -> tuple[int, int]:
    return os.getuid(), os.getgid()
