"""The Docker launcher against a stand-in engine, for what the real engine cannot show here:
a server that fails or never gets ready (a crash loop, a failed copy, a timeout), the probe's
own verdicts, and vLLM engine copies (whose image is not built here). Deploy, status, a killed
server, refusals and cleanup run against a real engine: test_real_docker.py.

The stand-in takes the launcher's calls the way the docker SDK does: every container's keyword
arguments go through the SDK's own translation into the Engine API's create body (unknown or
mistyped arguments fail there, as they would against a real engine), and inspection returns the
Engine API's fields (``State.Health``, ``RestartCount``). Server containers follow a script
(warming up, healthy, failed, crash-looping); the exporter container runs its real command with
its environment, and nginx is a small HTTP server that is ready only when every server is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from docker.api.client import APIClient
from docker.errors import ImageNotFound, NotFound
from docker.models.containers import _create_container_args

from neuronserve.backends import BackendKind
from neuronserve.config import Settings
from neuronserve.deploy import docker
from neuronserve.deploy.inventory import Inventory
from neuronserve.deploy.local import DeployError
from neuronserve.deploy.plan import Plan, make_plan
from tests.conftest import make_settings
from tests.integration.servers import free_port

# One server's script: its health as Docker would report it at its n-th inspection.
Script = Callable[[int], dict[str, Any]]


def warming_then_healthy(after: int) -> Script:
    def state(n: int) -> dict[str, Any]:
        if n < after:
            out = '{"status":"warming","copies_ready":0}'
            return {
                "State": {"Status": "running", "Health": {"Status": "starting", "Log": [{"Output": out}]}}
            }
        return {"State": {"Status": "running", "Health": {"Status": "healthy", "Log": [{"Output": "{}"}]}}}

    return state


def failed(n: int) -> dict[str, Any]:
    out = '{"status":"failed","error":"copy 0 could not load: out of device memory"}'
    return {"State": {"Status": "running", "Health": {"Status": "starting", "Log": [{"Output": out}]}}}


def crash_looping(n: int) -> dict[str, Any]:
    return {
        "State": {"Status": "restarting", "ExitCode": 3, "Health": {"Status": "starting"}},
        "RestartCount": n,
    }


def never_ready(n: int) -> dict[str, Any]:
    return warming_then_healthy(10**9)(n)


class _Container:
    def __init__(self, engine: _Engine, kwargs: dict[str, Any]) -> None:
        self.engine = engine
        self.name: str = kwargs["name"]
        self.labels: dict[str, str] = kwargs.get("labels", {})
        self.kwargs = kwargs
        # What the SDK would send the engine: the create body, HostConfig included.
        create = _create_container_args({"command": None, **kwargs, "version": "1.41"})
        create.pop("name")
        self.config: dict[str, Any] = engine.api.create_container_config(**create)
        self.inspections = 0
        self.attrs: dict[str, Any] = {"State": {"Status": "created"}, "RestartCount": 0}
        self.archives: list[tuple[str, bytes]] = []
        self.process: subprocess.Popen[bytes] | None = None
        self.http: ThreadingHTTPServer | None = None
        self.stopped_with: int | None = None

    # -- the docker SDK's Container API, as the launcher uses it
    def reload(self) -> None:  # an inspection, as containers.get makes one
        script = self.engine.scripts.get(self.labels.get("neuronserve.server", ""))
        if script is not None:
            self.attrs = {"RestartCount": 0, **script(self.inspections)}
            self.inspections += 1

    def logs(self, tail: int = 20) -> bytes:
        return f"{self.name}: last log line\n".encode()

    def put_archive(self, path: str, data: bytes) -> bool:
        self.archives.append((path, data))
        return True

    def start(self) -> None:
        server = self.labels.get("neuronserve.server")
        if server not in {"nginx", "exporter"}:
            return  # a server's health follows its script
        self.attrs = {"State": {"Status": "running"}, "RestartCount": 0}
        ((_inside, (host, port)),) = self.kwargs["ports"].items()
        if server == "nginx":
            self.http = _endpoint(host, port, self.engine)
        elif server == "exporter":  # the container's own command and environment, on the published port
            env = {
                **os.environ,
                **self.kwargs["environment"],
                "NEURONSERVE_MONITOR__HOST": host,
                "NEURONSERVE_MONITOR__PORT": str(port),
            }
            command = [sys.executable, "-m", "neuronserve.cli", *self.kwargs["command"][1:]]
            self.process = subprocess.Popen(
                command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
            )

    def stop(self, timeout: int | None = None) -> None:
        self.stopped_with = timeout
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()

    def remove(self) -> None:
        self.engine.containers.removed.append(self)
        del self.engine.containers.by_name[self.name]


class _Containers:
    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.by_name: dict[str, _Container] = {}
        self.removed: list[_Container] = []
        # Each container as it was made, with whether every server made before it was healthy.
        self.created: list[tuple[str, bool]] = []

    def run(self, **kwargs: Any) -> _Container:
        assert kwargs.get("detach") is True, "the launcher must not block on a server"
        container = self._add(kwargs)
        container.start()
        return container

    def create(self, **kwargs: Any) -> _Container:
        return self._add(kwargs)

    def _add(self, kwargs: dict[str, Any]) -> _Container:
        self.created.append((kwargs["name"], self.engine.servers_healthy()))
        container = _Container(self.engine, kwargs)
        self.by_name[container.name] = container
        return container

    def get(self, name: str) -> _Container:
        try:
            container = self.by_name[name]
        except KeyError:
            raise NotFound(f"No such container: {name}") from None
        container.reload()  # the SDK's get inspects the container: fresh attrs
        return container

    def list(self, all: bool = False, filters: dict[str, str] | None = None) -> list[_Container]:
        key, _, value = (filters or {}).get("label", "").partition("=")
        return [c for c in self.by_name.values() if not key or c.labels.get(key) == value]


class _Network:
    def __init__(self, networks: _Networks, name: str, labels: dict[str, str]) -> None:
        self.networks, self.name, self.labels = networks, name, labels

    def remove(self) -> None:
        self.networks.made.remove(self)


class _Networks:
    def __init__(self) -> None:
        self.made: list[_Network] = []

    def list(self, names: list[str] | None = None, filters: dict[str, str] | None = None) -> list[_Network]:
        key, _, value = (filters or {}).get("label", "").partition("=")
        return [
            n
            for n in self.made
            if (names is None or n.name in names) and (not key or n.labels.get(key) == value)
        ]

    def create(self, name: str, labels: dict[str, str]) -> _Network:
        network = _Network(self, name, labels)
        self.made.append(network)
        return network


class _Images:
    def __init__(self, present: set[str]) -> None:
        self.present = present

    def get(self, name: str) -> object:
        if name not in self.present:
            raise ImageNotFound(f"No such image: {name}")
        return object()


class _Engine:
    """The docker SDK's DockerClient surface the launcher uses."""

    def __init__(self, scripts: dict[str, Script], images: set[str]) -> None:
        self.api = APIClient(base_url="tcp://127.0.0.1:9", version="1.41")  # never connects
        self.scripts = scripts
        self.containers = _Containers(self)
        self.networks = _Networks()
        self.images = _Images(images)

    def servers_healthy(self) -> bool:
        servers = [
            c
            for c in self.containers.by_name.values()
            if c.labels.get("neuronserve.server", "") not in {"nginx", "exporter"}
        ]
        return bool(servers) and all(
            c.attrs.get("State", {}).get("Health", {}).get("Status") == "healthy" for c in servers
        )


def _endpoint(host: str, port: int, engine: _Engine) -> ThreadingHTTPServer:
    """nginx in front of the servers: /ready (before engine copies: /health) answers 200 only
    once every server is healthy."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = 200 if self.path in {"/ready", "/health"} and engine.servers_healthy() else 503
            self.server.hits.append((self.path, code))  # type: ignore[attr-defined]
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None: ...

    server = ThreadingHTTPServer((host, port), Handler)
    server.hits = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Callable[..., tuple[Settings, Plan, _Engine]]]:
    engines: list[_Engine] = []

    def make(
        scripts: dict[str, Script], *, images: set[str] | None = None, **values: str
    ) -> tuple[Settings, Plan, _Engine]:
        settings = make_settings(
            tmp_path,
            deploy__name="itest",
            deploy__cores_per_server=values.pop("cores_per_server", "1"),  # two servers on (0, 1)
            deploy__port=str(free_port()),
            deploy__ready_timeout_s=values.pop("ready_timeout_s", "60"),
            monitor__port=str(free_port()),
            monitor__period_s="0.2",
            **values,
        )
        plan = make_plan(settings, Inventory("cpu", (0, 1), {}), BackendKind.CPU)
        engine = _Engine(
            scripts, {"neuronserve-serve-cpu:latest", "nginx:1.27-alpine"} if images is None else images
        )
        engines.append(engine)
        return settings, plan, engine

    yield make
    for engine in engines:  # nothing a failed test started outlives it
        docker.cleanup(engine, "itest", timeout_s=1)


def _deploy(settings: Settings, plan: Plan, engine: _Engine, tmp_path: Path) -> list[dict[str, Any]]:
    specs = docker.container_specs(settings, plan, tmp_path / "artifacts")
    docker.deploy(engine, settings, plan, specs)
    return specs


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (failed, 'failed while starting: {"status":"failed","error":"copy 0 could not load'),
        (crash_looping, "keeps exiting while it starts (exit code 3)"),
        (never_ready, "not ready after 1s (waiting for "),
    ],
    ids=["reports-failed", "crash-loops", "times-out"],
)
def test_a_server_that_does_not_get_ready_fails_the_deploy_by_name_and_leaves_nothing(
    setup: Callable[..., tuple[Settings, Plan, _Engine]], tmp_path: Path, script: Script, reason: str
) -> None:
    settings, plan, engine = setup(
        {"server-0": warming_then_healthy(1), "server-1": script}, ready_timeout_s="1"
    )
    with pytest.raises(DeployError) as raised:
        _deploy(settings, plan, engine, tmp_path)
    message = str(raised.value)
    assert message.startswith(f"itest-server-1: {reason}"), message
    if script is never_ready:  # the endpoint waits for every server; the exporter may be up by then
        assert "itest-server-1" in message.split("waiting for ")[1] and "itest-nginx" in message
    assert "--- last lines of docker logs itest-server-1 ---\nitest-server-1: last log line" in message
    # Everything it started is gone, the exporter process included.
    assert not engine.containers.by_name and not engine.networks.made
    assert len(engine.containers.removed) == 4
    exporter = next(c for c in engine.containers.removed if c.name == "itest-exporter")
    assert exporter.process is not None and exporter.process.poll() is not None


@pytest.mark.parametrize(
    ("status", "body", "code"), [(200, '{"status":"ready"}', 0), (503, '{"status":"failed"}', 1)]
)
def test_the_ready_probe_prints_the_body_and_exits_by_status(status: int, body: str, code: int) -> None:
    """The probe Docker runs inside each server container, run against a stand-in /ready."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = body.encode()
            self.send_response(status if self.path == "/ready" else 404)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None: ...

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        probe = docker.READY_PROBE.replace(f":{docker.CONTAINER_PORT}/", f":{server.server_address[1]}/")
        assert probe != docker.READY_PROBE
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=False
        )
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == code
    assert json.loads(done.stdout) == json.loads(body)


@pytest.mark.parametrize("first_alone", [False, True], ids=["together", "first-compiles-alone"])
def test_engine_copies_deploy_as_one_container_each_behind_nginx(
    setup: Callable[..., tuple[Settings, Plan, _Engine]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    first_alone: bool,
) -> None:
    """A text-generation model with deploy.launcher=docker: one engine container per copy, the
    endpoint's probe is the engines' /health, and a copy that compiles first starts alone."""
    from neuronserve import containers
    from neuronserve.deploy import commands
    from neuronserve.generate import docker_launch
    from neuronserve.generate.artifacts import GenerationManifest, ModelFacts
    from neuronserve.generate.plan import make_generation_plan

    directory = tmp_path / "trace-models" / "smollm2" / "cpu"
    directory.mkdir(parents=True)
    facts = ModelFacts(30, 576, 9, 3, 64, 49152, 8192, 134_515_008, "float32")
    manifest = GenerationManifest(
        directory, "smollm2", "bundled:x", "0" * 64, BackendKind.CPU, directory, facts, {}
    )
    settings, _plan, engine = setup(
        {"copy-0": warming_then_healthy(3), "copy-1": warming_then_healthy(1)},
        images={"neuronserve-engine-cpu:latest", "nginx:1.27-alpine"},
        model__task="text-generation",
        model__name="smollm2",
        deploy__launcher="docker",
    )
    plan = make_generation_plan(
        settings, Inventory("cpu", (0, 1), {}, host_memory=16 << 30), manifest, "python3"
    )
    docker_launch.deploy(engine, settings, plan, manifest, first_alone=first_alone)

    made = engine.containers.created
    assert [name for name, _ in made] == ["itest-copy-0", "itest-copy-1", "itest-nginx"]
    assert made[1][1] is first_alone  # copy-1 was made once copy-0 was healthy, or at once
    copy = engine.containers.by_name["itest-copy-1"].config
    assert copy["HostConfig"]["CpusetCpus"] == "1" and copy["Image"] == "neuronserve-engine-cpu:latest"
    nginx = engine.containers.by_name["itest-nginx"].http
    assert nginx is not None and nginx.hits[-1] == ("/health", 200)  # type: ignore[attr-defined]
    monkeypatch.setattr(containers, "docker_engine", lambda: containers.Engine(engine, "stand-in engine"))
    capsys.readouterr()
    assert commands.status(settings) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines[1:3]] == [
        ["itest-copy-0", "running", "healthy"],
        ["itest-copy-1", "running", "healthy"],
    ]
    assert lines[-1].endswith("(ready)")
    assert docker.cleanup(engine, "itest") == 3
    stops = {c.name: c.stopped_with for c in engine.containers.removed}
    assert stops == {"itest-copy-0": 30, "itest-copy-1": 30, "itest-nginx": 10}
