"""A real Prometheus scraping a real deployment and the exporter; every dashboard query answers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from neuronserve.backends import BackendKind
from neuronserve.deploy import local
from neuronserve.deploy.inventory import cpu_inventory
from neuronserve.deploy.plan import make_plan
from neuronserve.monitor import dashboards
from tests.conftest import REPO, make_settings
from tests.integration.servers import free_port

MODEL = "all-MiniLM-L6-v2"  # the bundled model the deployment serves

pytestmark = pytest.mark.integration


def _poll(what: str, check: object, timeout_s: float = 90) -> object:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()  # type: ignore[operator]
            if last:
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # poll interval
    raise AssertionError(f"{what}: not satisfied after {timeout_s}s (last: {last})")


@pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus is installed by make test (scripts/system-deps.sh)"
)
def test_every_dashboard_query_returns_series(tmp_path: Path, bundled_artifacts: Path) -> None:
    sample = json.loads((REPO / "tests" / "fixtures" / "neuron-monitor-sample.json").read_text())
    replay = tmp_path / "reports.jsonl"
    replay.write_text(json.dumps(sample) + "\n")
    prom_port, exporter_port = free_port(), free_port()
    settings = make_settings(
        tmp_path,
        deploy__name="montest",
        deploy__run_dir=str(tmp_path / "run"),
        deploy__port=str(free_port()),
        deploy__base_port=str(free_port(8)),
        serve__artifacts=str(bundled_artifacts),
        serve__models_per_server="1",
        monitor__sources="host,replay",
        monitor__replay_file=str(replay),
        monitor__period_s="0.5",
        monitor__port=str(exporter_port),
        monitor__prometheus="true",
        monitor__prometheus_port=str(prom_port),
        monitor__scrape_interval_s="1",
    )
    plan = make_plan(settings, cpu_inventory(), BackendKind.CPU)
    prom = f"http://127.0.0.1:{prom_port}"
    with local.deployed(settings, plan, bundled_artifacts, None) as rd:
        _poll("prometheus ready", lambda: httpx.get(f"{prom}/-/ready").status_code == 200)
        _poll(
            "all targets up",
            lambda: (
                [t["health"] for t in httpx.get(f"{prom}/api/v1/targets").json()["data"]["activeTargets"]]
                == ["up"] * (len(plan.servers) + 1)
            ),
        )
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=f"http://{plan.host}:{plan.port}", timeout=30) as c:
                c.post("/predict", content=b"x" * 2_000_000)  # one rejection (413) for that panel
                while not stop.is_set():
                    c.post("/predict", json={"inputs": ["monitoring works", "a second input"]})

        loader = threading.Thread(target=load)
        loader.start()
        try:
            time.sleep(8)  # let Prometheus collect several scrapes of live traffic (1 s interval)
            missing = []
            for name, document in dashboards.dashboards().items():
                if name == "neuronserve-generation.json":
                    continue  # an LLM engine's metrics: tests/integration/test_generate.py
                # the variables as Grafana fills them: this deployment, every model
                for variable in document["templating"]["list"]:
                    if variable["type"] == "query":
                        series, label = re.fullmatch(
                            r"label_values\((.+), (\w+)\)", variable["query"]
                        ).groups()  # type: ignore[union-attr]
                        series = series.replace("$deployment", "montest")
                        values = httpx.get(f"{prom}/api/v1/label/{label}/values", params={"match[]": series})
                        assert ("montest" if label == "deployment" else MODEL) in values.json()["data"], (
                            name,
                            label,
                        )
                for expr in dashboards.expressions(document):
                    query = (
                        expr.replace("$__rate_interval", "30s")
                        .replace("$deployment", "montest")
                        .replace("$model", ".*")
                    )
                    try:
                        _poll(
                            f"{name}: {query}",
                            lambda q=query: httpx.get(f"{prom}/api/v1/query", params={"query": q}).json()[
                                "data"
                            ]["result"],
                            timeout_s=20,
                        )
                    except AssertionError:
                        missing.append(f"{name}: {query}")
        finally:
            stop.set()
            loader.join()
        assert missing == []

        # neuronserve top, one frame, against the same deployment
        env = {
            **os.environ,
            "NEURONSERVE_DEPLOY__NAME": "montest",
            "NEURONSERVE_DEPLOY__RUN_DIR": str(tmp_path / "run"),
            "NEURONSERVE_MONITOR__PORT": str(exporter_port),
        }
        top = subprocess.run(
            [sys.executable, "-m", "neuronserve.cli", "top", "--once", "--interval", "0.5"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
            cwd=tmp_path,
        )
        assert top.returncode == 0, top.stderr
        assert "montest" in top.stdout and "server-0" in top.stdout
        assert "nc0" in top.stdout and "cpu0" in top.stdout  # replayed NeuronCores and host CPUs
        exporter = httpx.get(f"http://127.0.0.1:{exporter_port}/metrics").text
        assert 'neuronserve_exporter_source_up{source="replay"} 1.0' in exporter
        assert 'neuronserve_exporter_source_up{source="host"} 1.0' in exporter
        assert 'neuronserve_server_cpu_ratio{server="server-0"}' in exporter
        assert (rd.path / "prometheus" / "targets" / "servers.json").is_file()
