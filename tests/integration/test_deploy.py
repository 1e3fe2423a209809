"""A real local deployment (supervisord + nginx + gunicorn servers) on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from neuronserve.backends import BackendKind
from neuronserve.config import Settings
from neuronserve.deploy import local
from neuronserve.deploy.inventory import cpu_inventory
from neuronserve.deploy.plan import Plan, make_plan
from tests.conftest import REPO, make_settings
from tests.integration.servers import free_port, tei_client

pytestmark = pytest.mark.integration


def _settings(tmp_path: Path, artifacts: Path, **extra: str) -> Settings:
    values = {
        "deploy__name": "itest",
        "deploy__run_dir": str(tmp_path / "run"),
        "deploy__port": str(free_port()),
        "deploy__base_port": str(free_port(8)),
        "serve__artifacts": str(artifacts),
        **extra,
    }
    return make_settings(tmp_path, **values)


@pytest.fixture
def deployment(tmp_path: Path, bundled_artifacts: Path) -> Iterator[tuple[Settings, Plan, local.RunDir]]:
    """The default layout, nothing hand-picked: several servers on a host of two CPUs or more."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the default layout has one server on a host of one CPU; these tests need several")
    settings = _settings(tmp_path, bundled_artifacts)
    plan = make_plan(settings, cpu_inventory(), BackendKind.CPU)
    with local.deployed(settings, plan, bundled_artifacts, None) as rd:
        yield settings, plan, rd
    # cleanup left nothing behind
    assert not rd.path.exists()
    assert not local.port_in_use(plan.host, plan.port)
    assert all(not local.port_in_use("127.0.0.1", s.port) for s in plan.servers)


def test_endpoint_serves_and_spreads_over_servers(deployment: tuple[Settings, Plan, local.RunDir]) -> None:
    _, plan, rd = deployment
    url = f"http://{plan.host}:{plan.port}"
    seen: Counter[str] = Counter()
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(8):
            r = client.post("/predict", json={"inputs": "hello"})
            assert r.status_code == 200
            seen[r.headers["x-server"]] += 1
        e = client.post("/v1/embeddings", json={"input": ["a", "b"]})
        assert e.status_code == 200 and len(e.json()["data"]) == 2
    # TEI's client through nginx: POST / embeds as /v1/embeddings does
    with tei_client(url) as tei:
        vectors = tei.feature_extraction(["a", "b"])
    assert np.allclose(vectors, [d["embedding"] for d in e.json()["data"]], atol=1e-5)
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/ready").status_code == 200
        assert client.get("/metrics").status_code == 404  # scraped per server, not public
    # A lone client stays on one server (its threads and caches stay warm) ...
    assert seen == {"itest-server-0": 8}
    assert (rd.path / "logs" / "nginx-access.log").read_text().count('"uri":"/predict"') == 8
    # ... and requests in flight together spread over every server.
    answers: list[tuple[int, str]] = []  # list.append is atomic: no lock needed across threads

    def client_of_four() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(4):
                r = client.post("/v1/embeddings", json={"input": "hello " * 100})
                answers.append((r.status_code, r.headers.get("x-server", "")))

    clients = [threading.Thread(target=client_of_four) for _ in range(16)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(120)
        assert not thread.is_alive(), "a client did not finish"
    assert len(answers) == 64 and {status for status, _ in answers} == {200}
    assert {server for _, server in answers} == {f"itest-server-{i}" for i in range(len(plan.servers))}
    # one request at a time: each ran alone on every core, its server's and the idle others'
    assert plan.shared_cores is not None and (rd.path / "cores.ledger").exists()
    every = len(plan.shared_cores)
    lent = 0.0
    for server in plan.servers:
        for line in httpx.get(f"http://127.0.0.1:{server.port}/metrics").text.splitlines():
            if line.startswith("neuronserve_batch_threads_total{") and f'threads="{every}"' in line:
                lent += float(line.rsplit(" ", 1)[1])
    assert lent >= 8, "lone requests did not run on every core"


def test_a_run_directory_deep_in_the_file_system_deploys_and_cleans_up(
    tmp_path: Path, bundled_artifacts: Path
) -> None:
    """A unix socket's path is short (107 bytes): supervisord's goes to a private directory when
    the run directory's would not fit, and status and cleanup find it there."""
    deep = tmp_path / ("a-checkout-in-a-deeply-nested-directory-" * 3) / "run"
    settings = _settings(tmp_path, bundled_artifacts, deploy__run_dir=str(deep), deploy__servers="1")
    plan = make_plan(settings, cpu_inventory(), BackendKind.CPU)
    rd = local.run_dir(settings)
    assert len(str(rd.path / "supervisor.sock")) > local.SOCKET_PATH_MAX
    with local.deployed(settings, plan, bundled_artifacts, None):
        assert rd.socket.parent == local.private_socket_directory() and rd.socket.exists()
        assert oct(local.private_socket_directory().stat().st_mode & 0o777) == "0o700"
        assert {p["name"] for p in local.Supervisor(rd).processes()} >= {"server-0", "nginx"}
        assert (
            httpx.post(f"http://{plan.host}:{plan.port}/predict", json={"inputs": "deep"}).status_code == 200
        )
    assert not rd.socket.exists() and not rd.path.exists()
    assert not local.port_in_use(plan.host, plan.port)


def test_second_deploy_of_the_same_name_is_refused(
    deployment: tuple[Settings, Plan, local.RunDir], bundled_artifacts: Path
) -> None:
    settings, plan, _rd = deployment
    with pytest.raises(local.DeployError, match="already running"):
        local.start(settings, plan, bundled_artifacts, None)


@pytest.mark.parametrize("victim_process", ["worker", "master"])
def test_killing_one_process_of_a_server_under_load(
    deployment: tuple[Settings, Plan, local.RunDir], tmp_path: Path, victim_process: str
) -> None:
    """SIGKILL of one process of the default layout under 8 clients, as the OOM killer or an
    operator does it: the worker, or the gunicorn master that supervisord watches. Nothing fails
    (nginx retries the other server, which borrows the dead one's cores: the kernel drops its
    locks in the core ledger), the server is back within 15 s, and no process of the old one
    lives on."""
    _, plan, rd = deployment
    url = f"http://{plan.host}:{plan.port}"
    victim = plan.servers[0]
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                try:
                    kind = str(c.post("/predict", json={"inputs": "steady load"}).status_code)
                except httpx.HTTPError as exc:
                    kind = f"{type(exc).__name__}: {exc}"
                with lock:
                    outcomes[kind] += 1

    def server_pids() -> tuple[int, int]:
        master = next(p["pid"] for p in local.Supervisor(rd).processes() if p["name"] == victim.name)
        workers = local.children(master)
        return master, workers[0] if workers else 0

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        while sum(outcomes.values()) < 20:
            time.sleep(0.05)  # poll: let the load reach a steady state
        master, worker = server_pids()
        killed = worker if victim_process == "worker" else master
        killed_at = time.monotonic()
        os.kill(killed, signal.SIGKILL)
        recovered = None
        with httpx.Client(timeout=1) as probe:
            while time.monotonic() - killed_at < 60:
                try:
                    _master, new_worker = server_pids()
                    if (
                        new_worker not in (0, worker)
                        and probe.get(f"http://127.0.0.1:{victim.port}/ready").status_code == 200
                    ):
                        recovered = time.monotonic() - killed_at
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)  # readiness poll interval
        settle = sum(outcomes.values())
        while sum(outcomes.values()) < settle + 20:
            time.sleep(0.05)  # some load after the recovery too
    finally:
        stop.set()
        for t in threads:
            t.join()
    failed = sum(v for k, v in outcomes.items() if k != "200")
    figures = {
        "killed": victim_process,
        "requests": sum(outcomes.values()),
        "failed": failed,
        "outcomes": dict(outcomes),
        "recovery_s": recovered,
    }
    (tmp_path / "crash-figures.json").write_text(json.dumps(figures))
    print(f"\ncrash recovery: {json.dumps(figures)}")
    assert not local.alive(master if victim_process == "master" else worker)
    assert not local.alive(worker), "the old worker outlived its master"  # killed with it, never orphaned
    if victim_process == "master":
        assert local.restarts(rd).get(victim.name) == 1
    else:  # gunicorn replaced its worker: status and metrics say so
        assert local.restarts(rd).get(victim.name, 0) == 0
        assert local.worker_restarts(rd, victim.name) == 1
        metrics = httpx.get(f"http://127.0.0.1:{victim.port}/metrics").text
        assert "neuronserve_worker_restarts 1.0" in metrics
    assert recovered is not None and recovered < 15, figures
    nginx_errors = (rd.path / "logs" / "nginx-error.log").read_text()[-3000:]
    assert failed == 0, (figures, nginx_errors)


def test_cleanup_after_supervisord_was_killed_leaves_nothing_and_deploy_works_again(
    tmp_path: Path, bundled_artifacts: Path
) -> None:
    settings = _settings(tmp_path, bundled_artifacts)
    plan = make_plan(settings, cpu_inventory(), BackendKind.CPU)
    rd = local.start(settings, plan, bundled_artifacts, None)
    try:
        local.wait_ready(settings, plan, rd)
        programs = local.deployment_processes(rd)
        assert len(programs) >= 2 * len(plan.servers) + 1  # masters, workers, nginx (and workers)
        supervisord = local.supervisord_pid(rd)
        assert supervisord is not None
        os.kill(supervisord, signal.SIGKILL)  # its programs are orphaned, still holding the ports
        while local.alive(supervisord):
            time.sleep(0.05)  # poll until the kernel has reaped it
        assert local.deployment_processes(rd)
        # a new deploy of the same name stops the orphans itself and starts cleanly
        rd = local.start(settings, plan, bundled_artifacts, None)
        local.wait_ready(settings, plan, rd)
        assert not any(local.alive(pid) for pid in programs)
    finally:
        local.stop(rd)
    assert local.deployment_processes(rd) == []
    assert not rd.path.exists()
    assert not local.port_in_use(plan.host, plan.port)
    assert all(not local.port_in_use("127.0.0.1", s.port) for s in plan.servers)


def test_cli_dry_run_and_status_of_nothing(tmp_path: Path, bundled_artifacts: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "neuronserve.cli"]
    common = ["--set", f"serve.artifacts={bundled_artifacts}", "--set", f"deploy.run_dir={tmp_path}"]
    dry = subprocess.run(
        [*args, "deploy", "--dry-run", *common],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
    )
    assert dry.returncode == 0, dry.stderr
    assert "server-0" in dry.stdout and "endpoint http://127.0.0.1:8080" in dry.stdout
    bad = subprocess.run(
        [*args, "deploy", "--dry-run", *common, "--set", "deploy.servers=99"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
    )
    assert bad.returncode == 2 and "at most" in bad.stderr
    status = subprocess.run(
        [*args, "status", *common], capture_output=True, text=True, env=env, cwd=REPO, check=False
    )
    assert status.returncode == 3 and "not running" in status.stdout
    clean = subprocess.run(
        [*args, "cleanup", *common], capture_output=True, text=True, env=env, cwd=REPO, check=False
    )
    assert clean.returncode == 0 and "nothing to clean up" in clean.stdout


# A probe slower than this is a stall, not noise: the Kubernetes base's probes time out at
# k8s.PROBE_TIMEOUT_S, and bench/probes_under_load.py measures ~0.1 s under this burst.
STALL_S = 5.0
LONG_TEXT = "Static shapes mean every request is padded to a compiled sequence length and batch size. " * 3


def test_an_open_loop_burst_above_saturation_restarts_nothing(
    deployment: tuple[Settings, Plan, local.RunDir], tmp_path: Path
) -> None:
    """300 requests/s for 6 s from hey (1,000 clients held to their share of the rate, so the
    offered load stays above what the deployment serves): every answer is 200, 429 or 503 (never
    a reset), /health never stalls, no process restarts, and a normal request succeeds right
    after. How fast the probes answer under overload is measured by bench/probes_under_load.py;
    this fails only on a stall (STALL_S), never on a slow figure."""
    import http.client
    import re
    import shutil

    _, plan, rd = deployment
    url = f"http://{plan.host}:{plan.port}"
    rate, duration, clients = 300.0, 6.0, 1000
    health: list[tuple[int, float]] = []
    stop = threading.Event()
    tool = shutil.which("hey")
    assert tool is not None, "hey is missing: make test installs it (scripts/system-deps.sh hey)"
    payload = tmp_path / "burst.json"
    payload.write_text(json.dumps({"inputs": LONG_TEXT}))

    def probe() -> None:
        """A kubelet's way: its own thread, a new connection each time."""
        while not stop.is_set():
            started = time.monotonic()
            connection = http.client.HTTPConnection("127.0.0.1", plan.servers[0].port, timeout=STALL_S)
            try:
                connection.request("GET", "/health")
                status = connection.getresponse().status
            except OSError:
                status = 0
            finally:
                connection.close()
            health.append((status, time.monotonic() - started))
            stop.wait(0.1)  # probe interval

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        burst = subprocess.run(
            [tool, "-z", f"{duration}s", "-c", str(clients), "-q", f"{rate / clients:.3f}", "-m", "POST",
             "-T", "application/json", "-D", str(payload), f"{url}/predict"],
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
    finally:
        stop.set()
        prober.join()
    assert burst.returncode == 0, burst.stderr[-2000:]
    codes = {code: int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", burst.stdout)}
    assert health, "the /health probe never ran"
    slowest = max(seconds for _, seconds in health)
    print(f"\nburst: {codes}; /health max {slowest * 1000:.0f} ms over {len(health)} probes")
    assert "Error distribution" not in burst.stdout, burst.stdout[-2000:]  # resets, timeouts
    assert set(codes) <= {"200", "429", "503"}, codes
    assert codes.get("200", 0) > 0 and codes.get("429", 0) + codes.get("503", 0) > 0, codes
    assert all(status == 200 for status, _ in health), health
    assert slowest < STALL_S, slowest
    assert all(n == 0 for n in local.restarts(rd).values()), local.restarts(rd)
    assert all(local.worker_restarts(rd, s.name) == 0 for s in plan.servers)
    after = httpx.post(f"{url}/predict", json={"inputs": "hello"}, timeout=5)
    assert after.status_code == 200
