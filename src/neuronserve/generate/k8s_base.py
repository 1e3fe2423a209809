"""The Kubernetes base of a text-generation model (``deploy.launcher=k8s``): one pod per engine
copy, requesting ``deploy.cores_per_server`` NeuronCores (its tensor-parallel degree) from the
Neuron device plugin, which hands it those cores (``NEURON_RT_VISIBLE_CORES``); on cpu the copy's
CPUs. ``deploy.k8s_replicas`` copies behind a Service.

The trace Job prepares the model where the servers' artifacts go (``deploy.k8s_artifacts``), an
init container copies it into the pod, and the engine image (``generate.engine_image``) runs the
same engine command as a local copy, on the pod's loopback. In front of it, in the same pod, the
deployment's nginx configuration (the local and Docker launchers' own: streams unbuffered, the
key checked at the edge for every route but ``/health``, JSON errors) is the pod's only way in:
vLLM itself checks a key on ``/v1`` routes only. The key comes from the Secret ``<name>-api-key``
as a file, read when nginx starts (never written into the base); nginx refuses to start when it
is empty. A second nginx port serves only ``/metrics``, which Prometheus scrapes, labelling each
copy's ``vllm:*`` series with ``deployment`` and ``copy`` (the pod), as the generation
dashboard expects.
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
from neuronserve.deploy.nginx import render_nginx_conf
from neuronserve.deploy.plan import PROBE_TIMEOUT_S, cores_per_server
from neuronserve.generate.artifacts import MANIFEST, GenerationManifest
from neuronserve.generate.engine import copy_command, engine_image, kv_cache_gib
from neuronserve.generate.plan import make_generation_plan

COMPILED = "/compiled"
WORKLOAD = "engine"
ENGINE_PORT = 8000  # the engine's, on the pod's loopback
METRICS_PORT = 9100  # the edge's port for Prometheus (/metrics only)
EDGE_IMAGE = "nginx:1.27-alpine"
TEMPLATE = "nginx.conf.template"  # the edge's configuration, the key a placeholder
TEMPLATE_DIR = "/etc/neuronserve/nginx"
KEY_PLACEHOLDER = "@API_KEY@"
# The edge's start: the key from the Secret's file into the configuration (refused when empty or
# unfit for nginx: the same characters check_api_key refuses), then nginx in the foreground.
EDGE_SCRIPT = r"""set -eu
if grep -q @API_KEY@ /etc/neuronserve/nginx/nginx.conf.template; then
  KEY="$(cat /etc/neuronserve/api-key/api-key)"
  case "$KEY" in
    "" | *[\"\'\\\ \;\{\}\$]*)
      echo "the API key in /etc/neuronserve/api-key/api-key is empty or has quotes, spaces, ;, {, }, backslashes or \$" >&2
      exit 1 ;;
  esac
  export KEY
fi
awk '{ while ((i = index($0, "@API_KEY@")) > 0) $0 = substr($0, 1, i - 1) ENVIRON["KEY"] substr($0, i + 9); print }' \
  /etc/neuronserve/nginx/nginx.conf.template > /tmp/nginx.conf
exec nginx -c /tmp/nginx.conf -g 'daemon off;'
"""


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
        port=ENGINE_PORT,
        kv_gib=kv_gib,
        compiled_dir=Path(COMPILED),
        pin=False,  # on loopback: the pod's nginx is its way in
    )
    env = dict(command.env)
    # The device plugin sets the pod's NeuronCores. On cpu which CPUs the pod gets is not known
    # (unless the kubelet pins them): its threads are its CPU count, unbound.
    env.pop("NEURON_RT_VISIBLE_CORES", None)
    if not backend.neuron_cores:
        env |= {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(tp)}
    env["HOME"] = k8s.TMP  # caches go to an emptyDir: the root filesystem is read-only
    argv = list(command.argv)
    return argv[:3], argv[3:], env


def edge_conf(settings: Settings) -> str:
    """The pod's nginx in front of its engine; the key (when one is set) a placeholder the edge
    fills in from the Secret when it starts."""
    return render_nginx_conf(
        listen_host="0.0.0.0",  # noqa: S104 - the pod's own address; the Service faces clients
        listen_port=k8s.SERVER_PORT,
        upstreams=[f"127.0.0.1:{ENGINE_PORT}"],
        run_dir=None,
        max_body_bytes=settings.serve.max_body_bytes,
        read_timeout_s=settings.generate.request_timeout_s,
        max_conns=settings.deploy.max_conns_per_server,
        streams=True,
        api_key=KEY_PLACEHOLDER if k8s.uses_api_key(settings) else "",
        metrics_listen=f"0.0.0.0:{METRICS_PORT}",
        metrics_key=settings.serve.metrics_need_key,
    )


def _edge(settings: Settings) -> dict[str, Any]:
    mounts = [
        {"name": "edge-conf", "mountPath": TEMPLATE_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": k8s.TMP},
        {"name": "edge-cache", "mountPath": "/var/cache/nginx"},
    ]
    if k8s.uses_api_key(settings):
        mounts.append({"name": "api-key", "mountPath": k8s.API_KEY_DIR, "readOnly": True})
    return {
        "name": "edge",
        "image": EDGE_IMAGE,
        "imagePullPolicy": "Always",
        "command": ["sh", "-c", EDGE_SCRIPT],
        "ports": [
            {"name": "http", "containerPort": k8s.SERVER_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": k8s.resources("500m", "256Mi"),
        "securityContext": k8s.security(),
        # Ready while the engine answers /health through it; alive while it accepts connections.
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": PROBE_TIMEOUT_S,
        },
        "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
        # Endpoints drop the pod before SIGTERM ends its streams.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(k8s.PRESTOP_S)]}}},
        "volumeMounts": mounts,
    }


def engine_deployment(settings: Settings, backend: BackendKind, memory: str, kv_gib: int) -> dict[str, Any]:
    name = f"{settings.deploy.name}-{WORKLOAD}"
    labels = k8s.component_labels(settings, WORKLOAD)
    period = 5
    tp = cores_per_server(settings, backend, None)
    command, args, env = pod_command(settings, backend, settings.model_name, kv_gib)
    # The engine listens on loopback only: the kubelet asks it from inside the container.
    probe = (
        "import sys, urllib.request; sys.exit(urllib.request.urlopen("
        f"'http://127.0.0.1:{ENGINE_PORT}/health', timeout={PROBE_TIMEOUT_S}).status != 200)"
    )
    health = {"exec": {"command": ["python3", "-c", probe]}, "timeoutSeconds": PROBE_TIMEOUT_S + 2}
    engine: dict[str, Any] = {
        "name": WORKLOAD,
        "image": engine_image(settings, backend, tag=__version__),
        "imagePullPolicy": "Always",
        "command": command,
        "args": args,
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
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
        {"name": "edge-cache", "emptyDir": {}},
        {"name": "edge-conf", "configMap": {"name": f"{settings.deploy.name}-edge"}},
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
    fetch = k8s.fetch_container(
        settings, backend, marker=MANIFEST, container_image=engine_image(settings, backend, tag=__version__)
    )
    return k8s.pod_deployment(
        settings,
        backend,
        name=name,
        labels=labels,
        grace_s=k8s.PRESTOP_S + 30,
        init_containers=[fetch],
        containers=[engine, _edge(settings)],
        volumes=volumes,
    )


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
    # Preparing a model takes no NeuronCore: one asked for could wait behind the engines' pods,
    # which wait for what it prepares.
    for container in (
        out["trace-job.yaml"]["spec"]["template"]["spec"].get("initContainers", [])
        + out["trace-job.yaml"]["spec"]["template"]["spec"]["containers"]
    ):
        for bound in container["resources"].values():
            bound.pop(k8s.NEURONCORE, None)
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
    policy = k8s.network_policy(settings, WORKLOAD, k8s.SERVER_PORT)
    policy["spec"]["ingress"][0]["ports"].append({"port": METRICS_PORT, "protocol": "TCP"})
    out["networkpolicy-engine.yaml"] = policy
    out["podmonitor-engine.yaml"] = k8s.pod_monitor(settings, WORKLOAD, "metrics")
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
    # The trace Job's settings: it prepares into trace.output_dir (the volume the pods copy
    # from), with no engine environment of its own to make.
    env = {
        **k8s.settings_env(settings, backend),
        "NEURONSERVE_SERVE__ARTIFACTS": "",
        "NEURONSERVE_DEPLOY__LAUNCHER": "k8s",
    }
    return k8s.write_base(
        settings,
        backend,
        directory,
        host_bytes,
        docs=objects(settings, backend, memory, kv_gib),
        env=env,
        workload=WORKLOAD,
        images=(engine_image(settings, backend, tag=__version__), EDGE_IMAGE),
        config_files={TEMPLATE: ("edge", edge_conf(settings))},
    )
