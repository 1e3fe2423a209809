"""Docker for the trace stage: build ``docker/trace-<backend>.Dockerfile`` and run it.

Every decision is a pure function of settings and host facts (:func:`trace_container_spec`), so
tests check the exact container a Neuron host would get; only :func:`docker_engine` talks to an
engine. Without a reachable engine the callers fall back to the local environment and say so.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Mapping, Sequence
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
    """``neuronserve-<stage>-<backend>:latest``; nginx is one image for every backend."""
    return "neuronserve-nginx:latest" if stage == "nginx" else f"neuronserve-{stage}-{backend}:latest"


def dockerfile(repo: Path, stage: str, backend: BackendKind) -> Path:
    return repo / "docker" / ("nginx.Dockerfile" if stage == "nginx" else f"{stage}-{backend}.Dockerfile")


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


def find_links() -> list[Path]:
    """The local directories pip's configuration and environment name as ``find-links``."""
    import subprocess
    import sys

    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    values = [
        line.split("=", 1)[1].strip("'\"") for line in listed if line.split("=", 1)[0].endswith("find-links")
    ]
    values.append(os.environ.get("PIP_FIND_LINKS", ""))
    found = [Path(v.removeprefix("file://")) for value in values for v in value.split()]
    return list(dict.fromkeys(p for p in found if p.is_dir()))


def stage_wheels(repo: Path, sources: Sequence[Path]) -> list[Path]:
    """Put the CPU torch wheels of ``sources`` at the version constraints/cpu.txt pins into the
    build context's docker/wheels (hard links where they can be), for a build whose CPU index is
    unreachable; returns what is there."""
    pins = [
        line
        for line in (repo / "constraints" / "cpu.txt").read_text().splitlines()
        if line.startswith("torch==")
    ]
    if not pins:
        return []
    version = pins[0].removeprefix("torch==").strip()
    target = repo / "docker" / "wheels"
    target.mkdir(parents=True, exist_ok=True)
    staged = []
    for source in sources:
        for wheel in sorted(source.glob(f"torch-{version}+cpu-*.whl")):
            placed = target / wheel.name
            if not placed.exists() or placed.stat().st_size != wheel.stat().st_size:
                placed.unlink(missing_ok=True)
                try:
                    os.link(wheel, placed)
                except OSError:
                    import shutil

                    shutil.copyfile(wheel, placed)
            staged.append(placed)
    return staged


class ImageBuildError(RuntimeError):
    """An image build failed: the step's error and the end of the build's output."""


def build_image(
    engine: Engine,
    repo: Path,
    stage: str,
    backend: BackendKind,
    *,
    base_image: str = "",
    emit: Callable[[str], None] | None = None,
    build_args: Mapping[str, str] | None = None,
    tag: str = "",
    no_cache: bool = False,
) -> str:
    """Build the ``stage`` (trace, serve, engine or nginx) image for ``backend``; returns its
    tag. ``base_image``: a cpu Dockerfile's BASE_IMAGE (empty: its own default). A cpu image's
    build context gets this host's CPU torch wheels (pip's find-links), if it has any. Each
    step's line goes to ``emit`` as the build reaches it. ``build_args`` (e.g. EXTRAS), ``tag``
    (default :func:`image_tag`) and ``no_cache`` are the build's own."""
    assert engine.client is not None, "this is a bug: build_image needs an engine"
    tag = tag or image_tag(stage, backend)
    # deploy.docker_base_image is the cpu images' base: a Neuron image keeps its DLC
    own_base = base_image and not backend.neuron_cores
    args = {**({"BASE_IMAGE": base_image} if own_base else {}), **(build_args or {})}
    if not backend.neuron_cores and stage in ("trace", "serve"):
        stage_wheels(repo, find_links())
    recent: list[str] = []
    chunks = engine.client.api.build(
        path=str(repo),
        dockerfile=str(dockerfile(repo, stage, backend).relative_to(repo)),
        tag=tag,
        rm=True,
        buildargs=args or None,
        nocache=no_cache,
        decode=True,
    )
    for chunk in chunks:
        if "error" in chunk:
            tail = "\n".join(recent[-15:])
            raise ImageBuildError(f"building {tag} failed: {str(chunk['error']).strip()}\n{tail}")
        for line in str(chunk.get("stream", "")).splitlines():
            recent = [*recent[-40:], line]
            if emit is not None and line.startswith("Step "):
                emit(f"{tag}: {line}")
    return tag


def run_trace_container(engine: Engine, spec: dict[str, Any], emit: Callable[[str], None]) -> int:
    """Run the trace container to completion, each line of its output to ``emit`` as it comes
    (a long trace shows its shapes one by one); returns its exit status. The container is
    removed whatever happens, an interrupt included."""
    assert engine.client is not None, "this is a bug: run_trace_container needs an engine"
    create = {k: v for k, v in spec.items() if k not in ("remove", "detach", "stdout", "stderr")}
    container = engine.client.containers.create(**create)
    try:
        container.start()
        pending = b""
        for chunk in container.logs(stream=True, follow=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                emit(line.decode(errors="replace"))
        if pending:
            emit(pending.decode(errors="replace"))
        return int(container.wait().get("StatusCode", 1))
    finally:
        container.remove(force=True)


def current_ids() -> tuple[int, int]:
    return os.getuid(), os.getgid()
