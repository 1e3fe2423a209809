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
import pytest

from neuronserve.config import Settings
from neuronserve.deploy import local
from neuronserve.deploy.inventory import cpu_inventory
from neuronserve.deploy.plan import Plan, make_plan
from tests.conftest import REPO, make_settings
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration


def _settings(tmp_path: Path, artifacts: Path, **extra: str) -> Settings:
    return make_settings(
        tmp_path,
        deploy__name="itest",
        deploy__run_dir=str(tmp_path / "run"),
        deploy__port=str(free_port()),
        deploy__base_port=str(free_port()),
        serve__artifacts=str(artifacts),
        serve__models_per_server="1",
        **extra,
    )


@pytest.fixture
def deployment(tmp_path: Path, bundled_artifacts: Path) -> Iterator[tuple[Settings, Plan, local.RunDir]]:
    settings = _settings(tmp_path, bundled_artifacts)
    plan = make_plan(settings, cpu_inventory(), "cpu")
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
        assert client.get("/ready").status_code == 200
    assert set(seen) == {f"itest-server-{i}" for i in range(len(plan.servers))}
    assert (rd.path / "logs" / "nginx-access.log").read_text().count('"uri":"/predict"') == 8


def test_second_deploy_of_the_same_name_is_refused(
    deployment: tuple[Settings, Plan, local.RunDir], bundled_artifacts: Path
) -> None:
    settings, plan, _rd = deployment
    with pytest.raises(local.DeployError, match="already running"):
        local.start(settings, plan, bundled_artifacts, None)


def test_crash_of_a_server_under_load(
    deployment: tuple[Settings, Plan, local.RunDir], tmp_path: Path
) -> None:
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
                    kind = type(exc).__name__
                with lock:
                    outcomes[kind] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        while sum(outcomes.values()) < 20:
            time.sleep(0.05)  # poll: let the load reach a steady state
        pid = next(p["pid"] for p in local.Supervisor(rd).processes() if p["name"] == victim.name)
        killed_at = time.monotonic()
        os.killpg(os.getpgid(pid), signal.SIGKILL)  # the server's gunicorn master and worker
        recovered = None
        with httpx.Client(timeout=1) as probe:
            while time.monotonic() - killed_at < 60:
                try:
                    new_pid = next(
                        p["pid"] for p in local.Supervisor(rd).processes() if p["name"] == victim.name
                    )
                    if (
                        new_pid not in (0, pid)
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
        "requests": sum(outcomes.values()),
        "failed": failed,
        "outcomes": dict(outcomes),
        "recovery_s": recovered,
    }
    (tmp_path / "crash-figures.json").write_text(json.dumps(figures))
    print(f"\ncrash recovery: {json.dumps(figures)}")
    assert local.restarts(rd).get(victim.name) == 1
    assert recovered is not None and recovered < 15, figures
    assert failed == 0, figures


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
