"""The Kubernetes base of a text-generation model (``deploy.launcher=k8s``): one pod per engine
copy, requesting ``deploy.cores_per_server`` NeuronCores (its tensor-parallel degree) from the
Neuron device plugin, which hands it those cores (``NEURON_RT_VISIBLE_CORES``); on cpu the copy's
CPUs. ``deploy.k8s_replicas`` copies behind a Service.

The trace Job prepares the model where the servers' artifacts go (``deploy.k8s_artifacts``), an
init container copies it into the pod, and the engine image (``generate.engine_image``) runs the
same engine command as a local copy. The API key, when set, comes from the Secret
``<name>-api-key`` as a file and is handed to the engine (vLLM checks it on ``/v1``); ``/health``
and ``/metrics`` stay open for probes and Prometheus, which labels each copy's ``vllm:*`` series
with ``deployment`` and ``copy`` (the pod), as the generation dashboard expects.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from neuronserve import __version__
from neuronserve.backends import BackendKind, CoreSet
from neuronserve.config import Settings
from neuronserve.deploy import k8s
from neuronserve.deploy.plan import PROBE_TIMEOUT_S, cores_per_server
from neuronserve.generate.artifacts import MANIFEST, GenerationManifest
from neuronserve.generate.engine import copy_command, engine_image, kv_cache_gib
from neuronserve.generate.plan import make_generation_plan

COMPILED = "/compiled"
WORKLOAD = "engine"


def pod_command(
    settings: Settings, backend: BackendKind, manifest_name: str, kv_gib: int
) -> tuple[list[str], list[str], dict[str, str]]:
    """The engine container's command, arguments and environment."""
    tp = cores_per_server(settings, backend, None)
    command = copy_command(
        settings,
        backend,
        python="python3",
        model_dir=Path("/artifacts") / manifest_name / backend.value,
        served_name=manifest_name,
        cores=CoreSet(tuple(range(tp))),
        port=k8s.SERVER_PORT,
        kv_gib=kv_gib,
        compiled_dir=Path(COMPILED),
        host="0.0.0.0",  # noqa: S104 - the pod's own address; the Service faces clients
        pin=False,
    )
    env = dict(command.env)
    # The device plugin sets the pod's NeuronCores. On cpu which CPUs the pod gets is not known
    # (unless the kubelet pins them): its threads are its CPU count, unbound.
    env.pop("NEURON_RT_VISIBLE_CORES", None)
    if not backend.neuron_cores:
        env |= {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(tp)}
    env["HOME"] = k8s.TMP  # caches go to an emptyDir: the root filesystem is read-only
    argv = list(command.argv)
    if k8s.uses_api_key(settings):  # the key from its Secret's file, never in the pod's spec
        key_file = f"{k8s.API_KEY_DIR}/api-key"
        return ["sh", "-c", f'VLLM_API_KEY="$(cat {key_file})" exec "$@"', "engine"], argv, env
    return argv[:3], argv[3:], env


def engine_deployment(settings: Settings, backend: BackendKind, memory: str, kv_gib: int) -> dict[str, Any]:
    name = f"{settings.deploy.name}-{WORKLOAD}"
    labels = k8s.component_labels(settings, WORKLOAD)
    period = 5
    tp = cores_per_server(settings, backend, None)
    command, args, env = pod_command(settings, backend, settings.model_name, kv_gib)
    health = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": PROBE_TIMEOUT_S}
    engine: dict[str, Any] = {
        "name": WORKLOAD,
        "image": engine_image(settings, backend, tag=__version__),
        "imagePullPolicy": "Always",
        "command": command,
        "args": args,
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "ports": [{"name": "http", "containerPort": k8s.SERVER_PORT, "protocol": "TCP"}],
        # Neuron: one vCPU per NeuronCore and one for the API server; cpu: the copy's threads.
        "resources": k8s.resources(
            str(tp + 1 if backend.neuron_cores else tp), memory, tp if backend.neuron_cores else 0
        ),
        "securityContext": k8s.security(),
        # vLLM listens once the model is loaded (and, on Neuron, compiled): /health then answers.
        "startupProbe": {
            **health,
            "periodSeconds": period,
            "failureThreshold": math.ceil(settings.generate.ready_timeout_s / period),
        },
        "readinessProbe": {**health, "periodSeconds": period},
        "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 3},
        # Endpoints drop the pod before SIGTERM ends its streams.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(k8s.PRESTOP_S)]}}},
        "volumeMounts": [
            {"name": "artifacts", "mountPath": "/artifacts", "readOnly": True},
            {"name": "dshm", "mountPath": k8s.SHM},
            {"name": "tmp", "mountPath": k8s.TMP},
            *([{"name": "compiled", "mountPath": COMPILED}] if backend.neuron_cores else []),
        ],
    }
    volumes: list[dict[str, Any]] = [
        {"name": "artifacts", "emptyDir": {}},
        {
            "name": "dshm",
            "emptyDir": {"medium": "Memory", "sizeLimit": "12Gi" if backend.neuron_cores else "1Gi"},
        },
        {"name": "tmp", "emptyDir": {}},
    ]
    if backend.neuron_cores:  # each pod compiles at its first start, into its own directory
        volumes.append({"name": "compiled", "emptyDir": {}})
    if settings.deploy.k8s_artifacts.startswith("pvc:"):
        claim = settings.deploy.k8s_artifacts.removeprefix("pvc:")
        volumes.append(
            {"name": "trace-models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
    if k8s.uses_api_key(settings):
        secret = {"secretName": f"{settings.deploy.name}-api-key", "defaultMode": 0o440}
        volumes.append({"name": "api-key", "secret": secret})
        engine["volumeMounts"].append({"name": "api-key", "mountPath": k8s.API_KEY_DIR, "readOnly": True})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels, "annotations": {"checkov.io/skip1": k8s.SKIP_DIGEST}},
        "spec": {
            "replicas": settings.deploy.k8s_replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": settings.deploy.name,
                    "automountServiceAccountToken": False,
                    "securityContext": k8s.pod_security(),
                    "terminationGracePeriodSeconds": k8s.PRESTOP_S + 30,
                    **k8s.placement(settings, backend),
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": labels},
                        }
                    ],
                    "initContainers": [k8s.fetch_container(settings, backend, marker=MANIFEST)],
                    "containers": [engine],
                    "volumes": volumes,
                },
            },
        },
    }


def objects(settings: Settings, backend: BackendKind, memory: str, kv_gib: int) -> dict[str, dict[str, Any]]:
    """File name -> object: the encoders' base with the engine copies in place of the servers."""
    d = settings.deploy
    engines = k8s.component_labels(settings, WORKLOAD)
    out = k8s.objects(settings, backend, None)
    for file_name in (
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
        "networkpolicy-server.yaml",
        "podmonitor-server.yaml",
    ):
        del out[file_name]
    out.pop("autoscaler.yaml", None)  # its metrics are the servers' own gauges
    out["serviceaccount.yaml"]["metadata"]["labels"] = engines
    out["deployment.yaml"] = engine_deployment(settings, backend, memory, kv_gib)
    out["service.yaml"] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": d.name, "labels": engines},
        "spec": {
            "type": "ClusterIP",
            "selector": engines,
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    out["pdb.yaml"] = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": f"{d.name}-{WORKLOAD}", "labels": engines},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": engines}},
    }
    out["networkpolicy-engine.yaml"] = k8s.network_policy(settings, WORKLOAD, k8s.SERVER_PORT)
    out["podmonitor-engine.yaml"] = k8s.pod_monitor(settings, WORKLOAD, "http")
    return out


def write_base(
    settings: Settings, backend: BackendKind, directory: Path, manifest: GenerationManifest | None
) -> list[Path]:
    """Write the base; each pod's memory from ``manifest`` (this host's prepared model) when
    there is one, else ``deploy.k8s_memory`` or a default."""
    kv_gib, host_bytes = kv_cache_gib(settings, 0), None
    if manifest is not None:
        one = dataclasses.replace(
            settings, deploy=dataclasses.replace(settings.deploy, servers="1", cores="")
        )
        plan = make_generation_plan(one, k8s.pod_inventory(settings, backend), manifest, "python3")
        kv_gib, host_bytes = plan.kv_gib, plan.copies[0].host_bytes
    memory = k8s.memory_request(settings, host_bytes)
    env = {**k8s.settings_env(settings, backend), "NEURONSERVE_DEPLOY__LAUNCHER": "k8s"}
    return k8s.write_base(
        settings,
        backend,
        directory,
        host_bytes,
        docs=objects(settings, backend, memory, kv_gib),
        env=env,
        workload=WORKLOAD,
        images=(engine_image(settings, backend, tag=__version__),),
    )
