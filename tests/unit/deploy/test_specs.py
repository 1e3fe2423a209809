"""The exact containers and generated configs a deployment would create."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from neuronserve.backends import BackendKind
from neuronserve.deploy.docker import compose_document, container_specs
from neuronserve.deploy.local import RunDir, render_supervisord_conf
from neuronserve.deploy.nginx import render_nginx_conf
from neuronserve.deploy.plan import make_plan
from tests.conftest import make_settings
from tests.unit.deploy.test_inventory_plan import load


def _specs(tmp_path: Path, shape: str, backend: str, per_server: str) -> list[dict[str, Any]]:
    settings = make_settings(tmp_path, deploy__cores_per_server=per_server, deploy__name="bert")
    plan = make_plan(settings, load(shape), BackendKind(backend))
    return container_specs(settings, plan, tmp_path / "art")


def _is_server(spec: dict[str, Any]) -> bool:
    return str(spec["labels"]["neuronserve.server"]).startswith("server-")


def test_inf2_48xlarge_one_core_per_server(tmp_path: Path) -> None:
    specs = _specs(tmp_path, "inf2.48xlarge", "neuronx", "1")
    servers = [s for s in specs if _is_server(s)]
    assert len(servers) == 24
    s5 = servers[5]  # core 5 lives on device 2 (2 cores per device), seen as neuron0, core 1
    assert s5["name"] == "bert-server-5"
    assert s5["devices"] == ["/dev/neuron2:/dev/neuron0:rwm"]
    assert s5["environment"]["NEURONSERVE_SERVE__CORES"] == "1"
    assert s5["environment"]["NEURONSERVE_SERVE__PORT"] == "8080"
    assert s5["volumes"] == {str((tmp_path / "art").resolve()): {"bind": "/artifacts", "mode": "ro"}}
    assert s5["labels"] == {
        "neuronserve.deployment": "bert",
        "neuronserve.server": "server-5",
        "neuronserve.cores": "5",
    }
    assert s5["restart_policy"] == {"Name": "unless-stopped"}
    assert s5["user"] == "10001:10001" and s5["cap_drop"] == ["ALL"]
    assert s5["network"] == "bert-net"
    nginx = specs[-1]
    assert nginx["ports"] == {"8080/tcp": ("127.0.0.1", 8080)}
    assert "server bert-server-23:8080" in nginx["nginx_conf"]


def test_inf2_48xlarge_two_cores_per_server(tmp_path: Path) -> None:
    servers = [s for s in _specs(tmp_path, "inf2.48xlarge", "neuronx", "2") if _is_server(s)]
    assert len(servers) == 12
    assert servers[3]["devices"] == ["/dev/neuron3:/dev/neuron0:rwm"]
    assert servers[3]["environment"]["NEURONSERVE_SERVE__CORES"] == "0-1"
    assert servers[3]["labels"]["neuronserve.cores"] == "6-7"


@pytest.mark.parametrize(
    ("per_server", "index", "devices", "cores"),
    [
        ("1", 6, ["/dev/neuron1:/dev/neuron0:rwm"], "2"),
        ("2", 3, ["/dev/neuron1:/dev/neuron0:rwm"], "2-3"),
        ("8", 1, ["/dev/neuron2:/dev/neuron0:rwm", "/dev/neuron3:/dev/neuron1:rwm"], "0-7"),
    ],
)
def test_inf1_6xlarge(tmp_path: Path, per_server: str, index: int, devices: list[str], cores: str) -> None:
    servers = [s for s in _specs(tmp_path, "inf1.6xlarge", "neuron", per_server) if _is_server(s)]
    assert servers[index]["devices"] == devices
    assert servers[index]["environment"]["NEURONSERVE_SERVE__CORES"] == cores
    assert servers[index]["image"] == "neuronserve-serve-neuron:latest"


def test_compose_file_mirrors_the_specs(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, deploy__cores_per_server="2", deploy__name="bert")
    plan = make_plan(settings, load("inf2.xlarge"), BackendKind.NEURONX)
    doc = compose_document(container_specs(settings, plan, tmp_path), plan)
    json.dumps(doc)  # serialisable (JSON is YAML)
    server = doc["services"]["bert-server-0"]
    assert server["devices"] == ["/dev/neuron0:/dev/neuron0:rwm"]
    assert server["environment"]["NEURONSERVE_SERVE__CORES"] == "0-1"
    assert doc["services"]["bert-nginx"]["ports"] == ["127.0.0.1:8080:8080"]
    assert server["healthcheck"]["test"][:3] == ["CMD", "python", "-c"]
    assert server["healthcheck"]["start_period"] == "300s"
    exporter = doc["services"]["bert-exporter"]
    assert exporter["command"] == ["neuronserve", "monitor", "--backend", "neuronx"]
    assert exporter["ports"] == ["127.0.0.1:9110:9110"]
    assert exporter["devices"] == ["/dev/neuron0:/dev/neuron0:rwm"]  # neuron-monitor sees the devices
    assert exporter["user"] == "10001:10001" and exporter["cap_drop"] == ["ALL"]
    assert exporter["healthcheck"] == {"disable": True}  # the image's probe is a server's
    assert "least_conn" in doc["configs"]["nginx_conf"]["content"]


def _nginx_conf(tmp_path: Path, upstreams: list[str], **kwargs: Any) -> str:
    return render_nginx_conf(
        listen_host="127.0.0.1",
        listen_port=8080,
        upstreams=upstreams,
        run_dir=tmp_path,
        max_body_bytes=1048576,
        read_timeout_s=125,
        **kwargs,
    )


def test_nginx_conf(tmp_path: Path) -> None:
    conf = _nginx_conf(tmp_path, ["127.0.0.1:8081", "127.0.0.1:8082"], max_conns=50, user=None)
    for directive in (
        "least_conn;",
        # each server once for one request at a time (ties to the first), then as a backup
        "server 127.0.0.1:8081 weight=100 max_fails=1 fail_timeout=2s max_conns=1;",
        "server 127.0.0.1:8082 max_fails=1 fail_timeout=2s max_conns=1;",
        "server 127.0.0.1:8081 backup max_fails=1 fail_timeout=2s max_conns=49;",
        "server 127.0.0.1:8082 backup max_fails=1 fail_timeout=2s max_conns=49;",
        "keepalive 64;",
        # retried on another server past both entries of a dead one, never after a timeout
        # (under overload it doubles the work)
        "proxy_next_upstream error http_502 http_503 non_idempotent;",
        "proxy_next_upstream_tries 3;",
        "worker_connections 16384;",
        "client_max_body_size 1048576;",
        "proxy_read_timeout 125s;",
        "listen 127.0.0.1:8080",
        f"pid {tmp_path}/nginx/nginx.pid;",
        "proxy_set_header X-Request-ID $neuronserve_request_id;",
    ):
        assert directive in conf, directive


def test_nginx_conf_lists_each_server_once_where_affinity_does_not_apply(tmp_path: Path) -> None:
    """One server, LLM engine copies (streams) or one request per server: each server once, as
    plain least_conn, and one retry; with three servers the first's weight keeps idle ties."""
    two = ["127.0.0.1:8081", "127.0.0.1:8082"]
    for text in (
        _nginx_conf(tmp_path, two[:1]),
        _nginx_conf(tmp_path, two, streams=True),
        _nginx_conf(tmp_path, two, max_conns=1),
    ):
        assert "backup" not in text and "weight=" not in text and "proxy_next_upstream_tries 2;" in text
        assert text.count("server 127.0.0.1:8081 max_fails=1") == 1
    three = _nginx_conf(tmp_path, [*two, "127.0.0.1:8083"])
    assert "server 127.0.0.1:8081 weight=200 max_fails=1 fail_timeout=2s max_conns=1;" in three
    assert three.count(" backup ") == 3 and "proxy_next_upstream_tries 3;" in three


def _supervisord_conf(tmp_path: Path, settings: Any, plan: Any, passthrough_env: dict[str, str]) -> str:
    return render_supervisord_conf(
        settings=settings,
        plan=plan,
        rd=RunDir(tmp_path / "run"),
        artifacts=tmp_path / "art",
        config=None,
        nginx="/usr/sbin/nginx",
        python="/py",
        passthrough_env=passthrough_env,
    )


def test_supervisord_conf(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, serve__drain_timeout_s="20", deploy__cores_per_server="1")
    from neuronserve.deploy.inventory import Inventory

    plan = make_plan(settings, Inventory("cpu", (0, 1), {}), BackendKind.CPU)
    conf = _supervisord_conf(tmp_path, settings, plan, {"PATH": "/bin"})
    assert "[program:server-0]" in conf and "[program:server-1]" in conf and "[program:nginx]" in conf
    assert 'NEURONSERVE_SERVE__CORES="1"' in conf
    assert 'NEURONSERVE_SERVE__PORT="8082"' in conf
    assert "autorestart=true" in conf
    assert "stopwaitsecs=35" in conf  # drain timeout + 15
    assert "stopasgroup=false" in conf  # gunicorn forwards TERM; the worker must not get two


def test_servers_get_the_deploys_effective_settings(tmp_path: Path) -> None:
    """Settings given to deploy by environment or --set reach every server, read back exactly
    as supervisord parses its own config (quotes, commas and % in values included)."""
    import configparser

    from supervisor.datatypes import dict_of_key_value_pairs

    from neuronserve.deploy.inventory import Inventory

    key = 'se"cr,et%1'
    settings = make_settings(
        tmp_path,
        deploy__cores_per_server="1",
        serve__max_batch_delay_ms="7",
        serve__api_key=key,
        serve__neuron_shared_weights="true",
        trace__cpu_engine="torchscript",
        trace__cpu_auto_cast="bf16",
    )
    plan = make_plan(settings, Inventory("cpu", (0, 1), {}), BackendKind.CPU)
    conf = _supervisord_conf(tmp_path, settings, plan, {"PATH": "/bin"})
    parser = configparser.ConfigParser(interpolation=configparser.BasicInterpolation())
    parser.read_string(conf)
    env = dict_of_key_value_pairs(parser.get("program:server-1", "environment"))
    assert env["NEURONSERVE_SERVE__MAX_BATCH_DELAY_MS"] == "7.0"
    assert env["NEURONSERVE_SERVE__API_KEY"] == key
    assert env["NEURONSERVE_SERVE__NEURON_SHARED_WEIGHTS"] == "true"
    assert env["NEURONSERVE_TRACE__CPU_AUTO_CAST"] == "bf16"
    # and what the plan decides per server wins over the section's value
    assert env["NEURONSERVE_SERVE__PORT"] == "8082"
    assert env["NEURONSERVE_SERVE__CORES"] == "1"
    # the servers lend each other their CPUs through one ledger in the run directory
    assert env["NEURONSERVE_SERVE__SHARED_CORES"] == "0-1"
    assert env["NEURONSERVE_SERVE__CORE_LEDGER"].endswith("/cores.ledger")
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"  # no OpenMP team spins on a CPU lent to another
    assert env["PATH"] == "/bin"


def test_a_value_supervisord_cannot_carry_is_refused(tmp_path: Path) -> None:
    from neuronserve.config import ConfigError
    from neuronserve.deploy.inventory import Inventory

    settings = make_settings(tmp_path, deploy__cores_per_server="1", serve__api_key='it\'s "both"')
    plan = make_plan(settings, Inventory("cpu", (0,), {}), BackendKind.CPU)
    with pytest.raises(ConfigError, match=r"serve\.api_key.*both ' and \""):
        _supervisord_conf(tmp_path, settings, plan, {})


def test_containers_get_the_deploys_effective_settings(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, serve__max_batch_delay_ms="7", serve__neuron_shared_weights="true", deploy__name="bert"
    )
    plan = make_plan(settings, load("inf2.xlarge"), BackendKind.NEURONX)
    (server, *_rest) = [s for s in container_specs(settings, plan, tmp_path / "art") if _is_server(s)]
    env = server["environment"]
    assert env["NEURONSERVE_SERVE__MAX_BATCH_DELAY_MS"] == "7.0"
    assert env["NEURONSERVE_SERVE__NEURON_SHARED_WEIGHTS"] == "true"
    assert env["NEURONSERVE_SERVE__ARTIFACTS"] == "/artifacts"  # the plan's values win
    assert env["NEURONSERVE_SERVE__HOST"] == "0.0.0.0"  # inside the container


def test_every_model_reaches_each_server_container_and_supervisord_program(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        deploy__name="rag",
        models__rerank__source="/models/ce",
        models__rerank__task="text-classification",
        models__rerank__copies="1",
        models__rerank__artifacts_fingerprint="abc",
    )
    plan = make_plan(settings, load("inf2.xlarge"), BackendKind.NEURONX)
    artifacts = {"all-MiniLM-L6-v2": tmp_path / "emb", "rerank": tmp_path / "rr"}
    server = next(s for s in container_specs(settings, plan, artifacts) if _is_server(s))
    assert server["volumes"] == {
        str((tmp_path / "emb").resolve()): {"bind": "/artifacts", "mode": "ro"},
        str((tmp_path / "rr").resolve()): {"bind": "/artifacts-rerank", "mode": "ro"},
    }
    env = server["environment"]
    assert env["NEURONSERVE_SERVE__ARTIFACTS"] == "/artifacts"
    assert env["NEURONSERVE_MODELS__RERANK__ARTIFACTS"] == "/artifacts-rerank"
    assert env["NEURONSERVE_MODELS__RERANK__TASK"] == "text-classification"
    assert env["NEURONSERVE_MODELS__RERANK__COPIES"] == "1"
    # the local launcher hands every model's settings to every program
    conf = render_supervisord_conf(
        settings=settings,
        plan=plan,
        rd=RunDir(tmp_path / "run"),
        artifacts=tmp_path / "emb",
        config=None,
        nginx="/usr/sbin/nginx",
        python="/usr/bin/python3",
        passthrough_env={},
    )
    for program in conf.split("[program:server-")[1:]:
        assert 'NEURONSERVE_MODELS__RERANK__SOURCE="/models/ce"' in program
        assert 'NEURONSERVE_MODELS__RERANK__ARTIFACTS_FINGERPRINT="abc"' in program


def test_a_key_file_is_mounted_into_each_server_container(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("k\n")
    settings = make_settings(tmp_path, serve__api_key_file="key")
    plan = make_plan(settings, load("inf2.xlarge"), BackendKind.NEURONX)
    server = next(s for s in container_specs(settings, plan, tmp_path / "art") if _is_server(s))
    assert server["volumes"][str(tmp_path / "key")] == {
        "bind": "/run/secrets/neuronserve-api-key",
        "mode": "ro",
    }
    assert server["environment"]["NEURONSERVE_SERVE__API_KEY_FILE"] == "/run/secrets/neuronserve-api-key"
