"""The exact trace container a Neuron host would get (no engine needed to check the spec)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from neuronserve.backends import BackendKind
from neuronserve.containers import docker_engine, trace_container_spec


def _spec(
    tmp_path: Path,
    backend: str,
    devices: list[str],
    model_dirs: dict[str, tuple[str, Path]] | None = None,
    environment: dict[str, str] | None = None,
) -> dict[str, Any]:
    (tmp_path / "config.properties").write_text("")
    (tmp_path / "out").mkdir(exist_ok=True)
    return trace_container_spec(
        backend=BackendKind(backend),
        repo=tmp_path,
        config_path=tmp_path / "config.properties",
        output_dir=tmp_path / "out",
        devices=devices,
        uid=1000,
        gid=1000,
        model_dirs=model_dirs,
        environment=environment,
    )


def test_neuronx_trace_container(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "neuronx", ["/dev/neuron0", "/dev/neuron1"])
    assert spec["image"] == "neuronserve-trace-neuronx:latest"
    assert spec["devices"] == ["/dev/neuron0:/dev/neuron0:rwm", "/dev/neuron1:/dev/neuron1:rwm"]
    assert spec["user"] == "1000:1000"
    assert spec["volumes"] == {
        str(tmp_path / "config.properties"): {"bind": "/workspace/config.properties", "mode": "ro"},
        str(tmp_path / "out"): {"bind": "/workspace/trace-models", "mode": "rw"},
    }
    assert spec["command"][:4] == ["neuronserve", "trace", "--runner", "local"]
    assert "trace.backend=neuronx" in spec["command"]
    assert "trace.output_dir=/workspace/trace-models" in spec["command"]


def test_cpu_trace_container_has_no_devices_and_mounts_a_local_model(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    reranker = tmp_path / "reranker"
    reranker.mkdir()
    settings = {"NEURONSERVE_MODELS__RERANK__TASK": "text-classification"}  # set by env, not in the file
    spec = _spec(
        tmp_path, "cpu", [], {"model": ("minilm", model), "models.rerank": ("rerank", reranker)}, settings
    )
    assert spec["environment"]["NEURONSERVE_MODELS__RERANK__TASK"] == "text-classification"
    assert "devices" not in spec
    assert spec["volumes"][str(model)] == {"bind": "/workspace/model", "mode": "ro"}
    assert spec["volumes"][str(reranker)] == {"bind": "/workspace/model-rerank", "mode": "ro"}
    command = spec["command"]
    assert "model.source=/workspace/model" in command
    # the name stays the host's: derived from the mount point, the artifacts would move
    assert "model.name=minilm" in command
    assert "models.rerank.source=/workspace/model-rerank" in command


def test_neuron_backend_without_devices_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="needs /dev/neuron"):
        _spec(tmp_path, "neuron", [])


def test_no_engine_here_is_reported_not_raised() -> None:
    engine = docker_engine(timeout_s=1)
    assert engine.client is None
    assert engine.reason.startswith("no Docker engine reachable")


@pytest.mark.parametrize(
    ("stage", "backend"), [("serve", "cpu"), ("trace", "cpu"), ("serve", "neuronx"), ("nginx", "cpu")]
)
def test_image_builds_take_their_dockerfile_and_only_cpu_images_the_base(stage: str, backend: str) -> None:
    """deploy.docker_base_image is the cpu images' base (and nginx's): a Neuron image keeps its
    DLC. A build's error is raised with the end of its output; every step is said."""
    from neuronserve.containers import Engine, ImageBuildError, build_image
    from tests.conftest import REPO

    builds: list[dict[str, Any]] = []
    said: list[str] = []

    class Api:  # the docker SDK's low-level build: recorded, and a stream of its chunks
        def build(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
            builds.append(kwargs)
            yield {"stream": "Step 1/2 : FROM base\n"}
            if kwargs["tag"].endswith(":broken"):
                yield {"error": "The command returned a non-zero code: 1"}
            yield {"stream": "Step 2/2 : CMD x\n"}

    class Client:
        api = Api()

    engine = Engine(Client(), "test engine")
    tag = build_image(
        engine, REPO, stage, BackendKind(backend), base_image="neuronserve-base:bookworm", emit=said.append
    )
    assert (REPO / builds[0]["dockerfile"]).is_file()
    assert builds[0]["dockerfile"] == (
        "docker/nginx.Dockerfile" if stage == "nginx" else f"docker/{stage}-{backend}.Dockerfile"
    )
    expected = None if backend == "neuronx" else {"BASE_IMAGE": "neuronserve-base:bookworm"}
    assert builds[0]["buildargs"] == expected and builds[0]["tag"] == tag
    assert said == [f"{tag}: Step 1/2 : FROM base", f"{tag}: Step 2/2 : CMD x"]
    with pytest.raises(ImageBuildError, match="non-zero code: 1\nStep 1/2 : FROM base"):
        build_image(engine, REPO, stage, BackendKind(backend), tag="x:broken")


def test_serve_images_run_as_a_user_and_probe_readiness() -> None:
    import re

    from neuronserve.deploy.docker import HEALTHCHECK_TIMEOUT_S
    from neuronserve.deploy.plan import PROBE_TIMEOUT_S
    from tests.conftest import REPO

    for backend in ("cpu", "neuronx", "neuron"):
        text = (REPO / "docker" / f"serve-{backend}.Dockerfile").read_text()
        assert "USER 10001" in text and "/ready" in text and 'CMD ["neuronserve", "serve"]' in text
        # the image's probe waits as long as the launchers' do (a busy server is not a dead one)
        assert re.search(r"HEALTHCHECK .*--timeout=(\d+)s", text).group(1) == str(HEALTHCHECK_TIMEOUT_S)  # type: ignore[union-attr]
        assert f"/ready', timeout={PROBE_TIMEOUT_S})" in text
        # the serve extra and tracing (the k8s trace Job runs this image; both bring ONNX Runtime,
        # the cpu default engine), never the tools of others
        assert "ARG EXTRAS=serve,trace\n" in text and '".[${EXTRAS}]"' in text
        if backend != "cpu":  # the DLC's entrypoint script must not stand between server and SIGTERM
            assert "ENTRYPOINT []" in text and "pip install -c /tmp/keep.txt" in text


def test_a_hub_model_is_traced_from_its_cache_directory_mounted_whole(tmp_path: Path) -> None:
    """A hub id keeps its id and revision in the container (the manifest records them): its
    cache directory is mounted whole, so the snapshot's links into blobs/ resolve there."""
    import os

    from neuronserve.containers import CONTAINER_HUB_CACHE
    from tests.conftest import build_tiny_model, hub_cache

    snapshot = hub_cache(
        tmp_path / "hub", "acme/tiny", build_tiny_model(tmp_path / "tiny", "feature-extraction")
    )
    repo_dir = snapshot.parent.parent
    (tmp_path / "config.properties").write_text("")
    (tmp_path / "out").mkdir()
    spec = trace_container_spec(
        backend=BackendKind("cpu"),
        repo=tmp_path,
        config_path=tmp_path / "config.properties",
        output_dir=tmp_path / "out",
        devices=[],
        uid=1000,
        gid=1000,
        hub_repos=[repo_dir],
    )
    mount = spec["volumes"][str(repo_dir)]
    assert mount == {"bind": f"{CONTAINER_HUB_CACHE}/models--acme--tiny", "mode": "ro"}
    assert spec["environment"]["HF_HUB_CACHE"] == CONTAINER_HUB_CACHE
    assert spec["environment"]["HF_HUB_OFFLINE"] == "1"
    assert not any(".source=" in part for part in spec["command"])  # the id stays as configured
    # every link of the snapshot stays inside the mounted directory
    for link in snapshot.rglob("*"):
        if link.is_symlink():
            target = (link.parent / os.readlink(link)).resolve()
            assert target.is_relative_to(repo_dir.resolve()) and target.is_file()
