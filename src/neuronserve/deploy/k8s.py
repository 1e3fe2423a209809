"""The Kubernetes launcher: a Kustomize base written from the same settings and plan as the local
and Docker launchers, so moving to a cluster changes the launcher, not the configuration.

One pod is one server (one core group of ``deploy.cores_per_server`` cores, every model in it);
the Neuron device plugin allocates the cores (``aws.amazon.com/neuroncore``) and the Neuron
scheduler extension keeps them contiguous. Nothing here talks to a cluster: ``deploy --emit DIR``
writes files, ``neuronserve k8s check DIR`` renders and validates them offline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from neuronserve import __version__
from neuronserve.backends import BackendKind
from neuronserve.config import Settings, format_value, settings_environment
from neuronserve.deploy.inventory import Inventory
from neuronserve.deploy.plan import PROBE_TIMEOUT_S, Plan, cores_per_server, make_plan

SERVER_PORT = 8080
EXPORTER_PORT = 9110
UID = 10001  # the serve images' user (docker/serve-*.Dockerfile)
AWS_CLI_IMAGE = "public.ecr.aws/aws-cli/aws-cli:2.22.35"
# Instance types with Neuron devices, per backend (the node.kubernetes.io/instance-type label).
INSTANCE_TYPES = {
    "neuronx": (
        "inf2.xlarge",
        "inf2.8xlarge",
        "inf2.24xlarge",
        "inf2.48xlarge",
        "trn1.2xlarge",
        "trn1.32xlarge",
        "trn1n.32xlarge",
    ),
    "neuron": ("inf1.xlarge", "inf1.2xlarge", "inf1.6xlarge", "inf1.24xlarge"),
}
NEURON_TAINT = "aws.amazon.com/neuron"
# Writable emptyDirs under a read-only root filesystem.
TMP = "/tmp"  # noqa: S108 - an emptyDir of the pod's own
SHM = "/dev/shm"  # noqa: S108 - a memory emptyDir of the pod's own
NEURONCORE = "aws.amazon.com/neuroncore"
DEFAULT_MEMORY = 4 << 30
# The autoscaler's metrics: two of the servers' own gauges (a test checks them against a real
# server's /metrics).
AUTOSCALE_METRICS = ("neuronserve_queue_depth", "neuronserve_inflight_requests")
# checkov policies this base does not meet, each with the reason (written into the object's
# annotations, where checkov reads skips).
SKIP_DIGEST = "CKV_K8S_43=the image is built by the user: pin its digest in an overlay (kustomize images:)"


def pod_inventory(settings: Settings, backend: BackendKind) -> Inventory:
    """What one pod has: ``deploy.cores_per_server`` cores, numbered from 0 as the pod sees them
    (its node's memory is not known here)."""
    cores = tuple(range(cores_per_server(settings, backend, None)))
    return Inventory("neuron" if backend.neuron_cores else "cpu", cores, {})


def pod_plan(settings: Settings, backend: BackendKind) -> Plan:
    """The plan of one pod: one server owning all of :func:`pod_inventory`'s cores."""
    deploy = dataclasses.replace(settings.deploy, servers="1", cores="")
    return make_plan(dataclasses.replace(settings, deploy=deploy), pod_inventory(settings, backend), backend)


def image(settings: Settings, backend: BackendKind) -> str:
    return settings.deploy.docker_image or f"neuronserve-serve-{backend}:{__version__}"


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


def memory_request(settings: Settings, host_bytes: int | None) -> str:
    if settings.deploy.k8s_memory:
        return settings.deploy.k8s_memory
    return f"{math.ceil((host_bytes or DEFAULT_MEMORY) / (256 << 20)) * 256}Mi"


def _cpu(settings: Settings, backend: BackendKind) -> str:
    """cpu: the server's cores; Neuron: one vCPU per NeuronCore and one for HTTP and tokenizing."""
    per_server = cores_per_server(settings, backend, None)
    return str(per_server + 1 if backend.neuron_cores else per_server)


def component_labels(settings: Settings, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "neuronserve",
        "app.kubernetes.io/instance": settings.deploy.name,
        "app.kubernetes.io/component": component,
    }


def _identity() -> dict[str, Any]:
    """Who every container of the base runs as: the images' non-root user, default seccomp."""
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def security() -> dict[str, Any]:
    return {
        **_identity(),
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security() -> dict[str, Any]:
    return {**_identity(), "fsGroup": UID}


def placement(settings: Settings, backend: BackendKind) -> dict[str, Any]:
    """Neuron: the scheduler extension, the Neuron taint tolerated, Neuron instance types only."""
    if not backend.neuron_cores:
        return {}
    placement: dict[str, Any] = {
        "tolerations": [{"key": NEURON_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "node.kubernetes.io/instance-type",
                                    "operator": "In",
                                    "values": list(INSTANCE_TYPES[backend]),
                                }
                            ]
                        }
                    ]
                }
            }
        },
    }
    if settings.deploy.k8s_scheduler:
        placement["schedulerName"] = settings.deploy.k8s_scheduler
    return placement


def resources(cpu: str, memory: str, neuroncores: int = 0) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if neuroncores:
        limits[NEURONCORE] = neuroncores
    return {"requests": dict(limits), "limits": limits}


def _model_dirs(settings: Settings, backend: BackendKind) -> dict[str, str]:
    """Each model's artifact directory, relative to the trace output (<name>/<backend>)."""
    return {name: f"{name}/{backend}" for name in settings.per_model()}


def settings_env(settings: Settings, backend: BackendKind) -> dict[str, str]:
    """The servers' and the trace Job's settings (the ConfigMap): every serve.*, trace.* and
    further model's key, then what a pod decides. Never the API key: that comes from a Secret."""
    dirs = _model_dirs(settings, backend)
    env = {
        **settings_environment(settings, "model", "serve", "trace"),
        "NEURONSERVE_TRACE__BACKEND": backend.value,
        "NEURONSERVE_TRACE__OUTPUT_DIR": "/trace-models",
        "NEURONSERVE_SERVE__HOST": "0.0.0.0",  # noqa: S104 - the pod's own address; the Service faces clients
        "NEURONSERVE_SERVE__PORT": str(SERVER_PORT),
        # cpu: every CPU the container has; Neuron: the cores the device plugin allocated
        # (NEURON_RT_VISIBLE_CORES, see serving.engine.server_cores).
        "NEURONSERVE_SERVE__CORES": "",
        "NEURONSERVE_SERVE__MODELS_PER_SERVER": str(pod_plan(settings, backend).servers[0].copies),
        "NEURONSERVE_SERVE__MODE": "gunicorn",
        "NEURONSERVE_SERVE__ACCESS_LOG": "off" if settings.serve.access_log == "off" else "on",
        "NEURONSERVE_SERVE__ARTIFACTS": f"/artifacts/{next(iter(dirs.values()))}",
        "NEURONSERVE_SERVE__ARTIFACTS_FINGERPRINT": "",  # each pod hashes what its init container copied
        "HF_HUB_OFFLINE": "1",
        "HOME": TMP,  # caches go to an emptyDir: the root filesystem is read-only
    }
    for m in settings.extra_models:
        env[f"NEURONSERVE_MODELS__{m.name.upper()}__ARTIFACTS"] = f"/artifacts/{dirs[m.name]}"
        env[f"NEURONSERVE_MODELS__{m.name.upper()}__ARTIFACTS_FINGERPRINT"] = ""
    env["NEURONSERVE_SERVE__API_KEY"] = ""
    env["NEURONSERVE_SERVE__API_KEY_FILE"] = f"{API_KEY_DIR}/api-key" if uses_api_key(settings) else ""
    return env


def fetch_container(
    settings: Settings, backend: BackendKind, marker: str = "manifest.json", container_image: str = ""
) -> dict[str, Any]:
    """Waits for every model's ``marker`` (its manifest) where the trace Job writes, then copies
    the artifacts into the pod (the server verifies every file against its manifest before
    serving). ``container_image``: the image that copies from a volume (default: the servers')."""
    dirs = " ".join(_model_dirs(settings, backend).values())
    source = settings.deploy.k8s_artifacts
    if source.startswith("s3://"):
        prefix = source.rstrip("/")
        script = (
            f"set -eu; for m in {dirs}; do "
            f'until aws s3 ls "{prefix}/$m/{marker}" >/dev/null; do echo "waiting for {prefix}/$m"; sleep 10; done; '
            f'aws s3 sync --only-show-errors "{prefix}/$m" "/artifacts/$m"; done'
        )
        container_image = AWS_CLI_IMAGE
        mounts: list[dict[str, Any]] = [{"name": "artifacts", "mountPath": "/artifacts"}]
    else:
        script = (
            f"set -eu; for m in {dirs}; do "
            f'until [ -f "/trace-models/$m/{marker}" ]; do echo "waiting for $m"; sleep 10; done; '
            f'mkdir -p "/artifacts/$m"; cp -R "/trace-models/$m/." "/artifacts/$m/"; done'
        )
        container_image = container_image or image(settings, backend)
        mounts = [
            {"name": "artifacts", "mountPath": "/artifacts"},
            {"name": "trace-models", "mountPath": "/trace-models", "readOnly": True},
        ]
    return {
        "name": "fetch-artifacts",
        "image": container_image,
        "imagePullPolicy": "Always",
        "command": ["sh", "-c", script],
        "env": [{"name": "HOME", "value": TMP}],  # the aws cli's cache
        "resources": resources("500m", "512Mi"),
        "securityContext": security(),
        "volumeMounts": [*mounts, {"name": "tmp", "mountPath": TMP}],
    }


API_KEY_DIR = "/etc/neuronserve/api-key"


def uses_api_key(settings: Settings) -> bool:
    """An API key is configured: the pods read it from the Secret <name>-api-key (key api-key),
    mounted as a file, which the user creates; its value is never written into the base."""
    return bool(settings.serve.api_key or settings.serve.api_key_file)


def deployment(settings: Settings, backend: BackendKind, memory: str) -> dict[str, Any]:
    name = f"{settings.deploy.name}-server"
    labels = component_labels(settings, "server")
    period = 5
    grace = grace_period_s(settings)
    neuroncores = cores_per_server(settings, backend, None) if backend.neuron_cores else 0
    server: dict[str, Any] = {
        "name": "server",
        "image": image(settings, backend),
        "imagePullPolicy": "Always",
        "command": ["neuronserve", "serve"],
        "envFrom": [{"configMapRef": {"name": f"{settings.deploy.name}-settings"}}],
        "env": [
            {"name": "NEURONSERVE_SERVE__NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "resources": resources(_cpu(settings, backend), memory, neuroncores),
        "securityContext": security(),
        # Start-up (hashing, loading, warming every shape) may take up to deploy.ready_timeout_s.
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": period,
            "timeoutSeconds": PROBE_TIMEOUT_S,
            "failureThreshold": math.ceil(settings.deploy.ready_timeout_s / period),
        },
        # Probes are answered ahead of inference work, but a saturated host still delays them:
        # Kubernetes' default timeout of 1 s would drop busy pods from the Service.
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": period,
            "timeoutSeconds": PROBE_TIMEOUT_S,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": PROBE_TIMEOUT_S,
            "failureThreshold": 3,
        },
        # Endpoints drop the pod before SIGTERM starts the drain (serve.drain_timeout_s).
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_S)]}}},
        "volumeMounts": [
            {"name": "artifacts", "mountPath": "/artifacts", "readOnly": True},
            {"name": "dshm", "mountPath": SHM},
            {"name": "tmp", "mountPath": TMP},
        ],
    }
    volumes: list[dict[str, Any]] = [
        {"name": "artifacts", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if settings.deploy.k8s_artifacts.startswith("pvc:"):
        claim = settings.deploy.k8s_artifacts.removeprefix("pvc:")
        volumes.append(
            {"name": "trace-models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
    if uses_api_key(settings):
        secret = {"secretName": f"{settings.deploy.name}-api-key", "defaultMode": 0o440}
        volumes.append({"name": "api-key", "secret": secret})
        server["volumeMounts"].append({"name": "api-key", "mountPath": API_KEY_DIR, "readOnly": True})
    return pod_deployment(
        settings,
        backend,
        name=name,
        labels=labels,
        grace_s=grace,
        init_containers=[fetch_container(settings, backend)],
        containers=[server],
        volumes=volumes,
    )


def pod_deployment(
    settings: Settings,
    backend: BackendKind,
    *,
    name: str,
    labels: dict[str, str],
    grace_s: int,
    init_containers: list[dict[str, Any]],
    containers: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
) -> dict[str, Any]:
    """A Deployment of ``deploy.k8s_replicas`` pods (servers', or engine copies'): the base's
    identity, placement on the Neuron nodes and spread over the hosts."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels, "annotations": {"checkov.io/skip1": SKIP_DIGEST}},
        "spec": {
            "replicas": settings.deploy.k8s_replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": settings.deploy.name,
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security(),
                    "terminationGracePeriodSeconds": grace_s,
                    **placement(settings, backend),
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": labels},
                        }
                    ],
                    "initContainers": init_containers,
                    "containers": containers,
                    "volumes": volumes,
                },
            },
        },
    }


PRESTOP_S = 5


def grace_period_s(settings: Settings) -> int:
    """Long enough for the preStop pause and the whole drain, with room to exit."""
    return PRESTOP_S + math.ceil(settings.serve.drain_timeout_s) + 10


def settings_hash(settings: Settings, backend: BackendKind) -> str:
    text = "".join(f"{k}={v}\n" for k, v in sorted(settings_env(settings, backend).items()))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def trace_job(settings: Settings, backend: BackendKind) -> dict[str, Any]:
    """Traces every model into the artifacts volume (pvc:) or uploads the trace (s3://)."""
    labels = component_labels(settings, "trace")
    trace: dict[str, Any] = {
        "name": "trace",
        "image": image(settings, backend),
        "imagePullPolicy": "Always",
        "command": ["neuronserve", "trace", "--runner", "local"],
        "envFrom": [{"configMapRef": {"name": f"{settings.deploy.name}-settings"}}],
        # Tracing may fetch a hub model (model.source=<hub id>); serving never does.
        "env": [{"name": "HF_HUB_OFFLINE", "value": "0"}, {"name": "TRANSFORMERS_OFFLINE", "value": "0"}],
        "resources": resources(_cpu(settings, backend), "8Gi", 1 if backend.neuron_cores else 0),
        "securityContext": security(),
        "volumeMounts": [
            {"name": "trace-models", "mountPath": "/trace-models"},
            {"name": "tmp", "mountPath": TMP},
        ],
    }
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    source = settings.deploy.k8s_artifacts
    if source.startswith("s3://"):
        volumes.append({"name": "trace-models", "emptyDir": {}})
        upload: dict[str, Any] = {
            "name": "upload",
            "image": AWS_CLI_IMAGE,
            "imagePullPolicy": "Always",
            "command": ["aws", "s3", "sync", "--only-show-errors", "/trace-models", source.rstrip("/")],
            "env": [{"name": "HOME", "value": TMP}],
            "resources": resources("500m", "512Mi"),
            "securityContext": security(),
            "volumeMounts": [
                {"name": "trace-models", "mountPath": "/trace-models", "readOnly": True},
                {"name": "tmp", "mountPath": TMP},
            ],
        }
        init, containers = [trace], [upload]
    else:
        claim = source.removeprefix("pvc:")
        volumes.append({"name": "trace-models", "persistentVolumeClaim": {"claimName": claim}})
        init, containers = [], [trace]
    spec: dict[str, Any] = {
        "serviceAccountName": settings.deploy.name,
        "automountServiceAccountToken": False,
        "restartPolicy": "Never",
        "securityContext": pod_security(),
        **placement(settings, backend),
        "containers": containers,
        "volumes": volumes,
    }
    if init:
        spec["initContainers"] = init
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            # A Job's pod template cannot change: settings that change what is traced make a new Job.
            "name": f"{settings.deploy.name}-trace-{settings_hash(settings, backend)}",
            "labels": labels,
            "annotations": {"checkov.io/skip1": SKIP_DIGEST},
        },
        "spec": {
            "backoffLimit": 1,
            "ttlSecondsAfterFinished": 86400,
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }


def autoscaler(settings: Settings) -> dict[str, Any] | None:
    d = settings.deploy
    target = _quantity(d.k8s_target_per_pod)
    deployment_name = f"{d.name}-server"
    if d.k8s_autoscaler == "hpa":
        return {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": deployment_name, "labels": component_labels(settings, "server")},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment_name},
                "minReplicas": d.k8s_replicas,
                "maxReplicas": d.k8s_max_replicas,
                # Per-pod averages of the servers' own gauges, served by a custom metrics adapter
                # (prometheus-adapter) under their Prometheus names.
                "metrics": [
                    {
                        "type": "Pods",
                        "pods": {
                            "metric": {"name": metric},
                            "target": {"type": "AverageValue", "averageValue": target},
                        },
                    }
                    for metric in AUTOSCALE_METRICS
                ],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
            },
        }
    if d.k8s_autoscaler == "keda":
        selector = f'namespace="{d.k8s_namespace}",pod=~"{deployment_name}-.*"'
        return {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": {"name": deployment_name, "labels": component_labels(settings, "server")},
            "spec": {
                "scaleTargetRef": {"name": deployment_name},
                "minReplicaCount": d.k8s_replicas,
                "maxReplicaCount": d.k8s_max_replicas,
                "cooldownPeriod": 300,
                "triggers": [
                    {
                        "type": "prometheus",
                        "name": metric.removeprefix("neuronserve_"),
                        "metadata": {
                            "serverAddress": d.k8s_prometheus_url,
                            "query": f"sum({metric}{{{selector}}})",
                            "threshold": format_value(d.k8s_target_per_pod),  # KEDA: a plain number
                        },
                    }
                    for metric in AUTOSCALE_METRICS
                ],
            },
        }
    return None


def exporter_daemonset(settings: Settings, backend: BackendKind) -> dict[str, Any]:
    """neuron-monitor and our exporter on every Neuron node (AWS's names and labels for its
    metrics, so AWS's dashboards work too)."""
    labels = component_labels(settings, "exporter")
    container = {
        "name": "exporter",
        "image": image(settings, backend),
        "imagePullPolicy": "Always",
        "command": ["neuronserve", "monitor", "--backend", backend.value],
        "env": [
            {"name": "NEURONSERVE_MONITOR__HOST", "value": "0.0.0.0"},  # noqa: S104 - scraped by Prometheus
            {"name": "NEURONSERVE_MONITOR__PORT", "value": str(EXPORTER_PORT)},
            {"name": "NEURONSERVE_MONITOR__SOURCES", "value": "neuron-monitor"},
            {"name": "NEURONSERVE_MONITOR__PERIOD_S", "value": format_value(settings.monitor.period_s)},
        ],
        "ports": [{"name": "metrics", "containerPort": EXPORTER_PORT, "protocol": "TCP"}],
        "resources": resources("500m", "256Mi"),
        # neuron-monitor reads every Neuron device's counters, as AWS's own DaemonSet does.
        "securityContext": {"privileged": True, "readOnlyRootFilesystem": True},
        "readinessProbe": {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 30},
        "volumeMounts": [{"name": "tmp", "mountPath": TMP}],
    }
    privileged = "neuron-monitor needs the Neuron devices of the node (AWS's DaemonSet runs privileged)"
    skips = [
        SKIP_DIGEST,
        f"CKV_K8S_16={privileged}",
        f"CKV_K8S_20={privileged}",
        f"CKV_K8S_23={privileged}",
        f"CKV_K8S_28={privileged}",
        f"CKV_K8S_37={privileged}",
        f"CKV_K8S_40={privileged}",
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": f"{settings.deploy.name}-exporter",
            "labels": labels,
            "annotations": {f"checkov.io/skip{i + 1}": s for i, s in enumerate(skips)},
        },
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": settings.deploy.name,
                    "automountServiceAccountToken": False,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    **{k: v for k, v in placement(settings, backend).items() if k != "schedulerName"},
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


# The label a pod's name becomes on its metrics, by component: what the dashboards group by.
POD_LABEL = {"server": "server", "engine": "copy"}


def pod_monitor(settings: Settings, component: str, port: str) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {
            "name": f"{settings.deploy.name}-{component}",
            "labels": component_labels(settings, component),
        },
        "spec": {
            "selector": {"matchLabels": component_labels(settings, component)},
            "podMetricsEndpoints": [
                {
                    "port": port,
                    "path": "/metrics",
                    # serve.metrics_need_key: the servers' /metrics wants the API key's Secret
                    **(
                        {
                            "authorization": {
                                "type": "Bearer",
                                "credentials": {"name": f"{settings.deploy.name}-api-key", "key": "api-key"},
                            }
                        }
                        if component in POD_LABEL
                        and settings.serve.metrics_need_key
                        and uses_api_key(settings)
                        else {}
                    ),
                    "interval": f"{_quantity(settings.monitor.scrape_interval_s)}s",
                    # the dashboards filter by deployment, as local deployments' targets are
                    # labelled, and group by server (or engine copy): one pod is one server
                    # (the exporter's series carry their own server label)
                    "relabelings": [
                        {"targetLabel": "deployment", "replacement": settings.deploy.name},
                        *(
                            [
                                {
                                    "sourceLabels": ["__meta_kubernetes_pod_name"],
                                    "targetLabel": POD_LABEL[component],
                                }
                            ]
                            if component in POD_LABEL
                            else []
                        ),
                    ],
                }
            ],
        },
    }


def network_policy(settings: Settings, component: str, port: int | None) -> dict[str, Any]:
    """Ingress to ``component``'s pods on ``port`` only (none at all when None)."""
    labels = component_labels(settings, component)
    spec: dict[str, Any] = {"podSelector": {"matchLabels": labels}, "policyTypes": ["Ingress"]}
    if port is not None:
        spec["ingress"] = [{"ports": [{"port": port, "protocol": "TCP"}]}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{settings.deploy.name}-{component}", "labels": labels},
        "spec": spec,
    }


def objects(settings: Settings, backend: BackendKind, host_bytes: int | None) -> dict[str, dict[str, Any]]:
    """File name -> object, every object of the base but the generated ConfigMaps."""
    d = settings.deploy
    server_labels = component_labels(settings, "server")
    out: dict[str, dict[str, Any]] = {
        "namespace.yaml": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": d.k8s_namespace}},
        "serviceaccount.yaml": {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": d.name, "labels": component_labels(settings, "server")},
            "automountServiceAccountToken": False,
        },
        "deployment.yaml": deployment(settings, backend, memory_request(settings, host_bytes)),
        "service.yaml": {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": d.name, "labels": server_labels},
            "spec": {
                "type": "ClusterIP",
                "selector": server_labels,
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
            },
        },
        "pdb.yaml": {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": f"{d.name}-server", "labels": server_labels},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": server_labels}},
        },
        "networkpolicy-server.yaml": network_policy(settings, "server", SERVER_PORT),
        # The trace Job takes no connections at all.
        "networkpolicy-trace.yaml": network_policy(settings, "trace", None),
        "podmonitor-server.yaml": pod_monitor(settings, "server", "http"),
        "trace-job.yaml": trace_job(settings, backend),
    }
    scaler = autoscaler(settings)
    if scaler is not None:
        out["autoscaler.yaml"] = scaler
    if backend.neuron_cores:
        out["exporter-daemonset.yaml"] = exporter_daemonset(settings, backend)
        out["networkpolicy-exporter.yaml"] = network_policy(settings, "exporter", EXPORTER_PORT)
        out["podmonitor-exporter.yaml"] = pod_monitor(settings, "exporter", "metrics")
    if d.k8s_artifacts.startswith("pvc:"):
        out["pvc.yaml"] = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": d.k8s_artifacts.removeprefix("pvc:"),
                "labels": component_labels(settings, "trace"),
            },
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "20Gi"}},
                **({"storageClassName": d.k8s_storage_class} if d.k8s_storage_class else {}),
            },
        }
    return out


def _image_entry(full: str) -> dict[str, str]:
    name, _, tag = full.rpartition(":") if ":" in full.rsplit("/", 1)[-1] else (full, "", "latest")
    return {"name": name, "newTag": tag}


def kustomization(
    settings: Settings,
    backend: BackendKind,
    files: list[str],
    dashboards: list[str],
    *,
    workload: str = "server",
    images: tuple[str, ...] = (),
    config_files: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``workload``: the Deployment whose replicas an overlay sets (``<name>-<workload>``);
    ``images``: further images an overlay may pin (an engine's); ``config_files``: further
    ConfigMaps (``<name>-<map>``) of one file each, by file name -> map."""
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": settings.deploy.k8s_namespace,
        "labels": [{"pairs": {"app.kubernetes.io/part-of": "neuronserve"}, "includeSelectors": False}],
        "resources": files,
        # Overlays change these without editing the base: image (and digest), replicas.
        "images": [_image_entry(full) for full in (image(settings, backend), *images)],
        "replicas": [{"name": f"{settings.deploy.name}-{workload}", "count": settings.deploy.k8s_replicas}],
        "configMapGenerator": [
            {"name": f"{settings.deploy.name}-settings", "envs": ["settings.env"]},
            {
                "name": f"{settings.deploy.name}-dashboards",
                "files": [f"dashboards/{f}" for f in dashboards],
                "options": {"labels": {"grafana_dashboard": "1"}, "disableNameSuffixHash": True},
            },
            *(
                {"name": f"{settings.deploy.name}-{config_map}", "files": [file_name]}
                for file_name, config_map in (config_files or {}).items()
            ),
        ],
    }


def write_base(
    settings: Settings,
    backend: BackendKind,
    directory: Path,
    host_bytes: int | None,
    *,
    docs: dict[str, dict[str, Any]] | None = None,
    env: dict[str, str] | None = None,
    workload: str = "server",
    images: tuple[str, ...] = (),
    config_files: dict[str, tuple[str, str]] | None = None,
) -> list[Path]:
    """Write the base into ``directory`` (its previous files are replaced); returns the files.

    ``docs``, ``env``, ``workload``, ``images``: another base's objects, settings, scaled
    Deployment and further images (an engine's), by default the servers'. ``config_files``:
    file name -> (ConfigMap, its text), each file a ConfigMap ``<name>-<map>`` of its own."""
    if directory.exists():
        shutil.rmtree(directory)
    (directory / "dashboards").mkdir(parents=True)
    written = []
    docs = objects(settings, backend, host_bytes) if docs is None else docs
    for file_name, document in docs.items():
        path = directory / file_name
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        written.append(path)
    env = settings_env(settings, backend) if env is None else env
    settings_file = directory / "settings.env"
    settings_file.write_text("".join(f"{k}={v}\n" for k, v in sorted(env.items())))
    from neuronserve.monitor import dashboards as grafana

    boards = grafana.dashboards()
    for file_name, board in boards.items():
        (directory / "dashboards" / file_name).write_text(grafana.render(board))
    dashboards = sorted(boards)
    for file_name, (_config_map, text) in (config_files or {}).items():
        (directory / file_name).write_text(text)
        written.append(directory / file_name)
    kust = directory / "kustomization.yaml"
    kust.write_text(
        yaml.safe_dump(
            kustomization(
                settings,
                backend,
                list(docs),
                dashboards,
                workload=workload,
                images=images,
                config_files={f: m for f, (m, _text) in (config_files or {}).items()},
            ),
            sort_keys=False,
        )
    )
    return [kust, settings_file, *written]


def documents(text: str) -> list[Mapping[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]
