"""The Kubernetes base: what the pods ask for, how they stop, what scales them, and a check that
renders, validates and scans it (and fails on what it must refuse)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from neuronserve.backends import BackendKind
from neuronserve.config import Settings, build_settings
from neuronserve.deploy import k8s
from neuronserve.deploy.k8s_check import check
from neuronserve.deploy.plan import PROBE_TIMEOUT_S
from tests.conftest import make_settings, ready_client, trace_tiny


def _objects(settings: Settings, backend: str) -> dict[str, dict[str, Any]]:
    return k8s.objects(settings, BackendKind(backend), host_bytes=None)


def _server(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = objects["deployment.yaml"]["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "server")


@pytest.mark.parametrize("cores", [1, 2, 4])
def test_a_pod_asks_for_the_neuroncores_of_one_server(tmp_path: Path, cores: int) -> None:
    settings = make_settings(tmp_path, deploy__cores_per_server=str(cores))
    objects = _objects(settings, "neuronx")
    resources = _server(objects)["resources"]
    assert resources["limits"][k8s.NEURONCORE] == cores == resources["requests"][k8s.NEURONCORE]
    pod = objects["deployment.yaml"]["spec"]["template"]["spec"]
    assert pod["schedulerName"] == "my-scheduler"  # the Neuron scheduler extension: contiguous cores
    assert pod["tolerations"] == [
        {"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"}
    ]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert "inf2.xlarge" in terms[0]["matchExpressions"][0]["values"]
    # cpu: CPUs, not NeuronCores, and the default scheduler
    cpu_objects = _objects(settings, "cpu")
    cpu = _server(cpu_objects)["resources"]["limits"]
    assert k8s.NEURONCORE not in cpu and cpu["cpu"] == str(cores)
    assert "schedulerName" not in cpu_objects["deployment.yaml"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("drain", ["0", "30", "47.5", "600"])
def test_the_grace_period_outlasts_the_drain_and_start_up_gets_its_time(tmp_path: Path, drain: str) -> None:
    settings = make_settings(tmp_path, serve__drain_timeout_s=drain, deploy__ready_timeout_s="420")
    pod = _objects(settings, "neuronx")["deployment.yaml"]["spec"]["template"]["spec"]
    server = _server(_objects(settings, "neuronx"))
    pre_stop = int(server["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(drain)
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 420
    assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    # a busy server is not a dead one: no probe keeps Kubernetes' default timeout of 1 s
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["timeoutSeconds"] == PROBE_TIMEOUT_S >= 5, probe
    security = server["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"


def _autoscaler_metrics(settings: Settings) -> set[str]:
    scaler = k8s.autoscaler(settings)
    assert scaler is not None
    if scaler["kind"] == "HorizontalPodAutoscaler":
        return {m["pods"]["metric"]["name"] for m in scaler["spec"]["metrics"]}
    return {re.match(r"sum\((\w+)\{", t["metadata"]["query"]).group(1) for t in scaler["spec"]["triggers"]}  # type: ignore[union-attr]


def test_the_autoscalers_metrics_are_what_a_real_server_exports(tmp_path: Path) -> None:
    artifacts = trace_tiny(tmp_path).directory
    with ready_client(make_settings(tmp_path, serve__artifacts=str(artifacts), serve__cores="0")) as client:
        exposition = client.get("/metrics").text
    exported = {f.name for f in text_string_to_metric_families(exposition)}
    for scaler in ("hpa", "keda"):
        wanted = _autoscaler_metrics(make_settings(tmp_path, deploy__k8s_autoscaler=scaler))
        assert wanted and wanted <= exported, (scaler, wanted - exported)


def test_the_settings_config_map_builds_each_models_server_settings(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        serve__api_key="s3cret",
        models__rerank__source="cross-encoder/x",
        models__rerank__task="text-classification",
    )
    env = k8s.settings_env(settings, BackendKind.NEURONX)
    assert "s3cret" not in "".join(env.values())  # the key comes from a mounted Secret
    rebuilt = build_settings({k: (v, "env") for k, v in _as_keys(env).items()})
    models = rebuilt.per_model()
    assert str(models["all-MiniLM-L6-v2"].serve.artifacts) == "/artifacts/all-MiniLM-L6-v2/neuronx"
    assert models["rerank"].serve.artifacts == "/artifacts/rerank/neuronx"
    assert rebuilt.serve.api_key_file == "/etc/neuronserve/api-key/api-key"
    assert rebuilt.trace.backend == "neuronx" and rebuilt.serve.cores == ""


def _as_keys(env: dict[str, str]) -> dict[str, str]:
    from neuronserve.config import env_overrides

    return {key: value for key, (value, _where) in env_overrides(env).items()}


@pytest.fixture(scope="module")
def emitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("k8s") / "base"
    settings = build_settings({"deploy.k8s_autoscaler": ("keda", "test")})
    k8s.write_base(settings, BackendKind.NEURONX, directory, host_bytes=None)
    return directory


def test_the_emitted_base_passes_the_check(emitted: Path) -> None:
    report = check(emitted)
    assert report.ok, report.text()
    assert (
        "ScaledObject/neuronserve-server" in report.objects
        and "PodMonitor/neuronserve-server" in report.objects
    )
    assert report.checkov_passed > 100


def test_when_metrics_need_the_key_the_pod_monitor_sends_the_api_key_secret(tmp_path: Path) -> None:
    """serve.metrics_need_key: Prometheus scrapes the servers with the API key's Secret as a
    bearer token, in a PodMonitor the operator's published schema accepts."""
    values = {"deploy.k8s_autoscaler": ("keda", "test"), "serve.api_key": ("k", "test")}
    for need_key in (False, True):
        settings = build_settings({**values, "serve.metrics_need_key": (str(need_key).lower(), "test")})
        endpoint = k8s.pod_monitor(settings, "server", "http")["spec"]["podMetricsEndpoints"][0]
        if not need_key:
            assert "authorization" not in endpoint
            continue
        secret = {"name": "neuronserve-api-key", "key": "api-key"}  # the one the pods mount
        assert endpoint["authorization"] == {"type": "Bearer", "credentials": secret}
        assert (
            "authorization"
            not in k8s.pod_monitor(settings, "exporter", "metrics")["spec"]["podMetricsEndpoints"][0]
        )
        directory = tmp_path / "base"
        k8s.write_base(settings, BackendKind.CPU, directory, host_bytes=None)
        report = check(directory)
        assert report.ok, report.text()


def _edit(directory: Path, file_name: str, change: Any) -> None:
    path = directory / file_name
    document = yaml.safe_load(path.read_text())
    change(document)
    path.write_text(yaml.safe_dump(document))


def test_the_check_refuses_unknown_fields_and_insecure_pods(emitted: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(emitted, broken)
    _edit(broken, "deployment.yaml", lambda d: d["spec"].update(replica=3))  # a typo of replicas
    _edit(broken, "autoscaler.yaml", lambda d: d["spec"].update(maxReplicas=9))  # HPA's field, not KEDA's
    server = lambda d: d["spec"]["template"]["spec"]["containers"][0]  # noqa: E731
    _edit(
        broken,
        "deployment.yaml",
        lambda d: server(d)["securityContext"].update(allowPrivilegeEscalation=True),
    )
    report = check(broken)
    assert not report.ok
    assert any("Deployment/neuronserve-server" in e and "replica" in e for e in report.schema_errors)
    assert any("ScaledObject/neuronserve-server" in e and "maxReplicas" in e for e in report.schema_errors)
    assert any(f.startswith("CKV_K8S_20 ") for f in report.checkov_failed), report.checkov_failed


def test_a_neuron_server_without_serve_cores_takes_the_cores_its_pod_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from neuronserve.config import ConfigError
    from neuronserve.serving.copies import server_cores

    settings = make_settings(tmp_path)  # serve.cores empty, as in the base's ConfigMap
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    with pytest.raises(ConfigError, match="neither is set"):
        server_cores(settings, BackendKind.NEURONX)
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "4-5")  # as the device plugin allocated them
    assert server_cores(settings, BackendKind.NEURONX).ids == (4, 5)
    explicit = make_settings(tmp_path, serve__cores="0")
    assert server_cores(explicit, BackendKind.NEURONX).ids == (0,)  # deploy's own choice wins


def test_the_trace_job_traces_what_the_config_names_and_is_replaced_when_that_changes(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, model__source="BAAI/bge-small-en-v1.5", deploy__k8s_autoscaler="keda")
    env = k8s.settings_env(settings, BackendKind.NEURONX)
    assert env["NEURONSERVE_MODEL__SOURCE"] == "BAAI/bge-small-en-v1.5"  # model.* reaches the Job
    assert env["NEURONSERVE_SERVE__ARTIFACTS"] == "/artifacts/bge-small-en-v1.5/neuronx"
    objects = _objects(settings, "neuronx")
    job = objects["trace-job.yaml"]
    trace = job["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "HF_HUB_OFFLINE", "value": "0"} in trace["env"]  # a hub id may be fetched to trace
    other = _objects(make_settings(tmp_path, model__source="BAAI/bge-base-en-v1.5"), "neuronx")
    assert other["trace-job.yaml"]["metadata"]["name"] != job["metadata"]["name"]  # a Job is immutable
    keda = objects["autoscaler.yaml"]["spec"]["triggers"][0]["metadata"]
    assert keda["threshold"] == "8.0"  # a plain number, as KEDA parses it
    # the dashboards' $deployment filter finds every series; servers are named by their pod
    deployment = {"targetLabel": "deployment", "replacement": settings.deploy.name}
    relabel = objects["podmonitor-server.yaml"]["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert relabel == [deployment, {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "server"}]
    exporter = objects["podmonitor-exporter.yaml"]["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert exporter == [deployment]
    assert objects["pvc.yaml"]["spec"]["storageClassName"] == "efs-sc"  # EBS cannot be ReadWriteMany


def test_an_api_key_is_mounted_from_its_secret_never_written(tmp_path: Path) -> None:
    pod = _objects(make_settings(tmp_path, serve__api_key="s3cret"), "cpu")["deployment.yaml"]["spec"][
        "template"
    ]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "api-key")
    assert volume["secret"]["secretName"] == "neuronserve-api-key"
    mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "api-key")
    assert (
        f"{mount['mountPath']}/api-key"
        == k8s.settings_env(make_settings(tmp_path, serve__api_key="x"), BackendKind.CPU)[
            "NEURONSERVE_SERVE__API_KEY_FILE"
        ]
    )
    assert "s3cret" not in yaml.safe_dump(pod)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"trace__backend": "auto"}, "set trace.backend"),
        ({"trace__backend": "neuronx", "deploy__name": "Demo.v2"}, "names Kubernetes objects"),
    ],
)
def test_emit_refuses_what_a_cluster_would(tmp_path: Path, values: dict[str, str], message: str) -> None:
    from neuronserve.deploy.commands import emit_k8s
    from neuronserve.deploy.local import DeployError

    with pytest.raises(DeployError, match=message):
        emit_k8s(make_settings(tmp_path, **values), tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_cpu_threads_follow_the_containers_cpu_limit(tmp_path: Path) -> None:
    from neuronserve.backends.cpu import cgroup_cpu_limit

    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 3  # 2.5 CPUs: three threads' worth, rounded up
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) == 2
    assert cgroup_cpu_limit(tmp_path / "none") is None


def test_the_check_says_what_is_missing_or_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuronserve.deploy import k8s_check

    with pytest.raises(k8s_check.CheckError, match="nope not found: install kubectl"):
        k8s_check.render(tmp_path, kubectl="nope")
    with pytest.raises(k8s_check.CheckError, match=r"kubectl kustomize .* failed"):
        k8s_check.render(tmp_path)  # no kustomization.yaml there
    monkeypatch.delenv("NEURONSERVE_CHECKOV", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("sys.prefix", str(tmp_path / "venv"))
    with pytest.raises(k8s_check.CheckError, match="checkov not found: install it in a venv of its own"):
        k8s_check.find_checkov(None)
    assert k8s_check.find_checkov("/opt/checkov") == "/opt/checkov"
    with pytest.raises(k8s_check.CheckError, match="checkov did not report"):
        k8s_check.run_checkov("kind: Namespace\n", "/bin/true")  # runs, prints nothing


def test_unparsable_visible_cores_are_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuronserve.config import ConfigError
    from neuronserve.serving.copies import server_cores

    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "two")
    with pytest.raises(ConfigError, match="NEURON_RT_VISIBLE_CORES"):
        server_cores(make_settings(tmp_path), BackendKind.NEURONX)
