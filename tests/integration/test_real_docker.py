"""The Docker path against a real engine: the images built, the seed's flow run on them.

``make test`` starts its own dockerd (scripts/docker-engine.sh: a private socket and data root)
and names it in NEURONSERVE_TEST_DOCKER_HOST; where no engine can run, every test here is
skipped with the reason. The engine is never DOCKER_HOST for the rest of the suite (whose local
paths must stay local): each command here is given it. The base image is python:3.11-slim when
a registry gives it, else scripts/docker-base.sh's, built from Debian packages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import REPO
from tests.integration.servers import free_port

ENGINE = os.environ.get("NEURONSERVE_TEST_DOCKER_HOST", "")
WHY = os.environ.get(
    "NEURONSERVE_TEST_DOCKER_WHY",
    "no Docker engine for these tests: make test starts one (scripts/docker-engine.sh start), "
    "or set NEURONSERVE_TEST_DOCKER_HOST=unix:///path/to/docker.sock",
)
pytestmark = [pytest.mark.integration, pytest.mark.real_docker, pytest.mark.skipif(not ENGINE, reason=WHY)]

PUBLIC_BASE = "python:3.11-slim"
NGINX = "neuronserve-nginx:latest"
NAME = "rdtest"
TEXT = "Inferentia serves transformer encoders behind nginx."


def _docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args],
        env={**os.environ, "DOCKER_HOST": ENGINE},
        capture_output=True,
        text=True,
        check=check,
    )


def _run(command: list[str], env: dict[str, str], timeout: float = 1500) -> str:
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="session")
def base_image() -> str:
    """python:3.11-slim when a registry gives it, else the Debian-built base."""
    if _docker("pull", PUBLIC_BASE, check=False).returncode == 0:
        return PUBLIC_BASE
    built = subprocess.run(
        [str(REPO / "scripts" / "docker-base.sh")],
        env={**os.environ, "DOCKER_HOST": ENGINE},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    return built.stdout.strip().splitlines()[-1]  # the tag, alone on stdout (its progress is on stderr)


@dataclass(frozen=True)
class Setup:
    tmp: Path
    env: dict[str, str]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def setup(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """The environment of every command: this engine, the base image, a small grid, our own
    directories and ports; the serve and nginx images built (the trace image is the test's)."""
    tmp = tmp_path_factory.mktemp("real-docker")
    port = free_port()
    keep = {k: v for k, v in os.environ.items() if not k.startswith("NEURONSERVE_")}
    env = {
        **keep,
        "DOCKER_HOST": ENGINE,
        "NEURONSERVE_DEPLOY__DOCKER_BASE_IMAGE": base_image,
        "NEURONSERVE_DEPLOY__DOCKER_NGINX_IMAGE": NGINX,
        "NEURONSERVE_DEPLOY__LAUNCHER": "docker",
        "NEURONSERVE_DEPLOY__NAME": NAME,
        "NEURONSERVE_DEPLOY__CORES": "0-1",  # two servers of one core each, whatever the host has
        "NEURONSERVE_DEPLOY__SERVERS": "2",
        "NEURONSERVE_DEPLOY__PORT": str(port),
        "NEURONSERVE_DEPLOY__RUN_DIR": str(tmp / "run"),
        "NEURONSERVE_MONITOR__PORT": str(free_port()),
        "NEURONSERVE_TRACE__OUTPUT_DIR": str(tmp / "trace-models"),
        # the seed's flow at a small grid: four shapes, each verified as always
        "NEURONSERVE_TRACE__BATCH_SIZES": "1,4",
        "NEURONSERVE_TRACE__SEQUENCE_LENGTHS": "32,128",
    }
    # what a run that died before its cleanup left (the engine's stop also removes it)
    subprocess.run(["./fast-api/cleanup.sh"], cwd=REPO, env=env, capture_output=True, check=False)
    _docker("rm", "-f", "rdtest-foreign", check=False)
    cli = str(REPO / ".venv" / "bin" / "neuronserve")
    for stage in ("serve", "nginx"):
        _run([cli, "image", "build", stage], env)
    return Setup(tmp, env, port)


@pytest.fixture(scope="module")
def traced(setup: Setup) -> tuple[Path, str]:
    """``./trace-model/build.sh && ./trace-model/run.sh``, as the seed runs them."""
    built = _run(["./trace-model/build.sh"], setup.env)
    assert "built neuronserve-trace-cpu:latest" in built, built
    ran = _run(["./trace-model/run.sh"], setup.env)
    return setup.tmp / "trace-models" / "all-MiniLM-L6-v2" / "cpu", ran


@pytest.fixture(scope="module")
def deployed(setup: Setup, traced: tuple[Path, str]) -> Iterator[Setup]:
    _run(["./fast-api/deploy.sh"], setup.env)
    try:
        yield setup
    finally:
        subprocess.run(["./fast-api/cleanup.sh"], cwd=REPO, env=setup.env, capture_output=True, check=False)


def _inspect(name: str) -> dict[str, Any]:
    inspected: list[dict[str, Any]] = json.loads(_docker("inspect", name).stdout)
    return inspected[0]


def _servers() -> list[str]:
    listed = _docker("ps", "-a", "--filter", f"label=neuronserve.deployment={NAME}", "--format", "{{.Names}}")
    return sorted(n for n in listed.stdout.split() if "-server-" in n)


def test_the_trace_image_writes_verified_artifacts_on_the_host(traced: tuple[Path, str]) -> None:
    directory, output = traced
    assert "tracing in container image neuronserve-trace-cpu:latest" in output, output[-2000:]  # not the venv
    manifest = subprocess.run(
        [str(REPO / ".venv/bin/neuronserve"), "manifest", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert manifest.returncode == 0, manifest.stdout + manifest.stderr
    shapes = {(s["batch_size"], s["sequence_length"]) for s in _manifest(directory)["shapes"]}
    assert shapes == {(1, 32), (4, 32), (1, 128), (4, 128)}


def _manifest(directory: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
    return loaded


def test_a_failed_trace_container_and_a_failed_build_say_so_and_leave_nothing(
    setup: Setup, traced: tuple[Path, str]
) -> None:
    """A trace that fails inside its container fails run.sh with the container's status (its
    output streamed above) and leaves no container; a build whose base cannot be had fails
    ``image build`` in one message naming the image."""
    not_a_model = setup.tmp / "not-a-model"
    not_a_model.mkdir(exist_ok=True)
    (not_a_model / "config.json").write_text("{}")  # a directory the host takes; no model inside
    env = {**setup.env, "NEURONSERVE_MODEL__SOURCE": str(not_a_model), "NEURONSERVE_MODEL__NAME": "broken"}
    failed = subprocess.run(
        ["./trace-model/run.sh"], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    said = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "tracing in container image" in said, said[-3000:]
    assert "the trace container exited with status" in said, said[-3000:]
    assert _docker("ps", "-aq", "--filter", "label=neuronserve.stage=trace").stdout.strip() == ""
    cli = str(REPO / ".venv" / "bin" / "neuronserve")
    no_base = {**setup.env, "NEURONSERVE_DEPLOY__DOCKER_BASE_IMAGE": "neuronserve-no-such-base:1"}
    build = subprocess.run(
        [cli, "image", "build", "nginx"], cwd=REPO, env=no_base, capture_output=True, text=True, check=False
    )
    assert build.returncode == 1 and "building neuronserve-nginx:latest failed" in build.stderr, build.stderr[
        -2000:
    ]
    assert "Traceback" not in build.stderr


def test_each_server_is_a_pinned_unprivileged_container_behind_nginx(deployed: Setup) -> None:
    from sentence_transformers import SentenceTransformer

    from neuronserve.models import resolve_source

    servers = _servers()
    assert len(servers) == 2, servers
    cpusets = set()
    for name in servers:
        attrs = _inspect(name)
        host = attrs["HostConfig"]
        cpusets.add(host["CpusetCpus"])
        assert host["Memory"] >= 512 << 20  # a limit, from the memory plan
        assert host["RestartPolicy"]["Name"] == "unless-stopped"
        assert _docker("exec", name, "id", "-u").stdout.strip() != "0"
        mounts = {m["Destination"]: m for m in attrs["Mounts"]}
        assert mounts["/artifacts"]["RW"] is False
        assert attrs["State"]["Health"]["Status"] == "healthy"
    assert cpusets == {"0", "1"}  # one core each, as the plan says
    names = _docker(
        "ps", "--filter", f"label=neuronserve.deployment={NAME}", "--format", "{{.Names}}"
    ).stdout.split()
    assert {f"{NAME}-nginx", f"{NAME}-exporter"} <= set(names)  # in front, and the metrics beside
    metrics = httpx.get(f"http://127.0.0.1:{deployed.env['NEURONSERVE_MONITOR__PORT']}/metrics", timeout=10)
    assert metrics.status_code == 200 and "neuronserve_exporter_source_up" in metrics.text
    status = _run(["./fast-api/status.sh"], deployed.env)
    lines = status.splitlines()
    header = next(line for line in lines if line.startswith("container"))
    assert header.split() == ["container", "state", "health", "cores", "restarts"]
    assert sum(1 for line in lines if "-server-" in line and " healthy " in line) == 2, status
    answer = httpx.post(f"{deployed.url}/embed", json={"inputs": TEXT}, timeout=30)
    assert answer.status_code == 200, answer.text
    expected = SentenceTransformer(str(resolve_source("bundled:all-MiniLM-L6-v2")), device="cpu").encode(
        [TEXT], normalize_embeddings=True
    )[0]
    got = np.asarray(answer.json()[0])
    assert float(got @ expected / np.linalg.norm(got) / np.linalg.norm(expected)) >= 0.9999


def test_a_second_deploy_is_refused_and_a_missing_image_named(deployed: Setup) -> None:
    again = subprocess.run(
        ["./fast-api/deploy.sh"], cwd=REPO, env=deployed.env, capture_output=True, text=True, check=False
    )
    assert again.returncode != 0 and "already running in Docker" in again.stderr + again.stdout
    other = {**deployed.env, "NEURONSERVE_DEPLOY__NAME": "rdmissing", "NEURONSERVE_DEPLOY__PORT": str(free_port()),
             "NEURONSERVE_DEPLOY__DOCKER_IMAGE": "neuronserve-serve-cpu:no-such-tag"}  # fmt: skip
    missing = subprocess.run(
        ["./fast-api/deploy.sh"], cwd=REPO, env=other, capture_output=True, text=True, check=False
    )
    said = missing.stderr + missing.stdout
    assert (
        missing.returncode != 0
        and "image neuronserve-serve-cpu:no-such-tag is not on this Docker engine" in said
    )
    assert _docker("ps", "-aq", "--filter", "label=neuronserve.deployment=rdmissing").stdout.strip() == ""


def test_a_server_container_killed_under_load_loses_no_request(deployed: Setup) -> None:
    """8 clients through nginx; the first server's process is SIGKILLed (as the kernel's OOM
    killer or a crash would end it: ``docker kill`` is a stop by hand, which no restart policy
    undoes); nginx sends its requests to the other, and the engine restarts it by policy."""
    victim = _servers()[0]
    first = _inspect(victim)
    if os.geteuid() != 0 or not Path(f"/proc/{first['State']['Pid']}").exists():
        pytest.skip(
            "killing a container's process needs root in the engine's PID namespace (our own engine's)"
        )
    before, started_at = first["RestartCount"], first["State"]["StartedAt"]
    outcomes: Counter[int | str] = Counter()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    outcomes[
                        http.post(
                            f"{deployed.url}/embed", json={"inputs": [TEXT, "a second text"]}
                        ).status_code
                    ] += 1
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while sum(outcomes.values()) < 50:  # under load first
            assert time.monotonic() < deadline, outcomes
            time.sleep(0.05)
        os.kill(_inspect(victim)["State"]["Pid"], signal.SIGKILL)
        deadline = time.monotonic() + 240
        while True:  # back by the restart policy (a new start), and healthy again
            state = _inspect(victim)
            again = state["RestartCount"] > before and state["State"]["StartedAt"] != started_at
            if again and state["State"].get("Health", {}).get("Status") == "healthy":
                break
            assert time.monotonic() < deadline, state["State"]
            time.sleep(0.5)
        served_after = sum(outcomes.values())
        deadline = time.monotonic() + 60
        while sum(outcomes.values()) < served_after + 50:  # and both serve on
            assert time.monotonic() < deadline and all(t.is_alive() for t in threads), outcomes
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert set(outcomes) == {200}, outcomes


def test_cleanup_removes_what_it_made_and_nothing_else(deployed: Setup) -> None:
    """Last in this module: it takes the deployment down (pytest runs a module's tests in order)."""
    _docker("run", "-d", "--name", "rdtest-foreign", deployed.env["NEURONSERVE_DEPLOY__DOCKER_BASE_IMAGE"],
            "sleep", "600")  # fmt: skip
    _docker("network", "create", "rdtest-foreign-net")
    _docker("volume", "create", "rdtest-foreign-vol")
    try:
        _run(["./fast-api/cleanup.sh"], deployed.env)
        label = f"label=neuronserve.deployment={NAME}"
        assert _docker("ps", "-aq", "--filter", label).stdout.strip() == ""
        assert _docker("network", "ls", "-q", "--filter", label).stdout.strip() == ""
        assert _docker("volume", "ls", "-q", "--filter", label).stdout.strip() == ""
        assert _inspect("rdtest-foreign")["State"]["Running"] is True
        assert "rdtest-foreign-net" in _docker("network", "ls", "--format", "{{.Name}}").stdout.split()
        assert "rdtest-foreign-vol" in _docker("volume", "ls", "--format", "{{.Name}}").stdout.split()
        assert not (deployed.tmp / "run" / NAME).exists()
    finally:
        _docker("rm", "-f", "rdtest-foreign", check=False)
        _docker("network", "rm", "rdtest-foreign-net", check=False)
        _docker("volume", "rm", "rdtest-foreign-vol", check=False)
