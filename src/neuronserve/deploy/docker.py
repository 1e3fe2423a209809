"""The Docker launcher: one container per server, an nginx container, a private network.

Every container is a pure function of the plan (:func:`container_specs`), so tests check the
exact containers an Inf2 or Inf1 host would get. Each server sees only its own devices,
remapped to ``/dev/neuron0..k``, with ``NEURON_RT_VISIBLE_CORES`` relative to them. Cleanup
removes only containers labelled with the deployment's name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from neuronserve.config import Settings, section_environment
from neuronserve.deploy.nginx import render_nginx_conf
from neuronserve.deploy.plan import Plan, ServerPlan

LABEL = "neuronserve.deployment"
CONTAINER_PORT = 8080
ARTIFACTS_MOUNT = "/artifacts"
NGINX_IMAGE = "nginx:1.27-alpine"


def relative_cores(server: ServerPlan, cores_per_device: int | None) -> str:
    """The server's cores as numbered inside its container (its first device becomes neuron0)."""
    if cores_per_device is None or not server.devices:
        return str(server.cores)
    offset = server.devices[0] * cores_per_device
    first, last = server.cores.ids[0] - offset, server.cores.ids[-1] - offset
    return str(first) if first == last else f"{first}-{last}"


def server_spec(
    settings: Settings, plan: Plan, server: ServerPlan, artifacts: Path, image: str
) -> dict[str, Any]:
    name = f"{plan.deployment}-{server.name}"
    env = {
        # The deploy's effective settings, then what the plan decides for this container.
        **section_environment(settings, "serve"),
        **section_environment(settings, "trace"),
        "NEURONSERVE_SERVE__HOST": "0.0.0.0",  # noqa: S104 - inside the container, on the private network
        "NEURONSERVE_SERVE__PORT": str(CONTAINER_PORT),
        "NEURONSERVE_SERVE__CORES": relative_cores(server, plan.cores_per_device),
        "NEURONSERVE_SERVE__NAME": name,
        "NEURONSERVE_SERVE__MODELS_PER_SERVER": str(server.copies),
        "NEURONSERVE_SERVE__ARTIFACTS": ARTIFACTS_MOUNT,
        "NEURONSERVE_SERVE__MODE": "gunicorn",
        "HF_HUB_OFFLINE": "1",
    }
    spec: dict[str, Any] = {
        "name": name,
        "image": image,
        "command": ["neuronserve", "serve"],
        "environment": env,
        "volumes": {str(artifacts.resolve()): {"bind": ARTIFACTS_MOUNT, "mode": "ro"}},
        "labels": {
            LABEL: plan.deployment,
            "neuronserve.server": server.name,
            "neuronserve.cores": str(server.cores),
        },
        "network": f"{plan.deployment}-net",
        "restart_policy": {"Name": "unless-stopped"},
        "user": "10001:10001",
        "security_opt": ["no-new-privileges"],
        "cap_drop": ["ALL"],
        "stop_signal": "SIGTERM",
        "stop_grace_period_s": int(settings.serve.drain_timeout_s) + 10,
        "detach": True,
    }
    if plan.backend == "cpu":
        spec["cpuset_cpus"] = str(server.cores)  # CPU ids are not renumbered inside a container
    else:
        spec["devices"] = [f"/dev/neuron{d}:/dev/neuron{i}:rwm" for i, d in enumerate(server.devices)]
    return spec


def nginx_spec(settings: Settings, plan: Plan) -> dict[str, Any]:
    return {
        "name": f"{plan.deployment}-nginx",
        "image": NGINX_IMAGE,
        "labels": {LABEL: plan.deployment, "neuronserve.server": "nginx"},
        "network": f"{plan.deployment}-net",
        "ports": {f"{CONTAINER_PORT}/tcp": (plan.host, plan.port)},
        "restart_policy": {"Name": "unless-stopped"},
        "detach": True,
        "nginx_conf": render_nginx_conf(
            listen_host="0.0.0.0",  # noqa: S104 - inside the container; published on deploy.host only
            listen_port=CONTAINER_PORT,
            upstreams=[f"{plan.deployment}-{s.name}:{CONTAINER_PORT}" for s in plan.servers],
            run_dir=None,
            max_body_bytes=settings.serve.max_body_bytes,
            read_timeout_s=settings.serve.max_request_timeout_ms / 1000 + 5,
            max_conns=settings.deploy.max_conns_per_server,
        ),
    }


def container_specs(settings: Settings, plan: Plan, artifacts: Path) -> list[dict[str, Any]]:
    image = settings.deploy.docker_image or f"neuronserve-serve-{plan.backend}:latest"
    return [
        *(server_spec(settings, plan, s, artifacts, image) for s in plan.servers),
        nginx_spec(settings, plan),
    ]


def compose_document(specs: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """The same deployment as a compose file (JSON is valid YAML)."""
    services: dict[str, Any] = {}
    for spec in specs:
        service: dict[str, Any] = {
            "image": spec["image"],
            "container_name": spec["name"],
            "labels": spec["labels"],
            "restart": spec["restart_policy"]["Name"],
            "networks": [spec["network"]],
        }
        if "command" in spec:
            service["command"] = spec["command"]
            service["environment"] = spec["environment"]
            service["volumes"] = [f"{src}:{v['bind']}:{v['mode']}" for src, v in spec["volumes"].items()]
            service["user"] = spec["user"]
            service["security_opt"] = spec["security_opt"]
            service["cap_drop"] = spec["cap_drop"]
            service["stop_grace_period"] = f"{spec['stop_grace_period_s']}s"
            if "devices" in spec:
                service["devices"] = spec["devices"]
            if "cpuset_cpus" in spec:
                service["cpuset"] = spec["cpuset_cpus"]
        else:
            host, port = spec["ports"][f"{CONTAINER_PORT}/tcp"]
            service["ports"] = [f"{host}:{port}:{CONTAINER_PORT}"]
            service["configs"] = [{"source": "nginx_conf", "target": "/etc/nginx/nginx.conf"}]
        services[spec["name"]] = service
    nginx = next(s for s in specs if "nginx_conf" in s)
    return {
        "name": plan.deployment,
        "services": services,
        "networks": {f"{plan.deployment}-net": {"internal": False}},
        "configs": {"nginx_conf": {"content": nginx["nginx_conf"]}},
    }


def write_compose(path: Path, specs: list[dict[str, Any]], plan: Plan) -> None:
    path.write_text(json.dumps(compose_document(specs, plan), indent=2) + "\n")


def launch(engine_client: Any, specs: list[dict[str, Any]], plan: Plan) -> None:
    """Create the network and containers through the docker SDK."""
    import io
    import tarfile

    network = f"{plan.deployment}-net"
    if not engine_client.networks.list(names=[network]):
        engine_client.networks.create(network, labels={LABEL: plan.deployment})
    for spec in specs:
        kwargs = {k: v for k, v in spec.items() if k not in {"nginx_conf", "stop_grace_period_s"}}
        if "nginx_conf" in spec:
            container = engine_client.containers.create(**{k: v for k, v in kwargs.items() if k != "detach"})
            data = spec["nginx_conf"].encode()
            archive = io.BytesIO()
            with tarfile.open(fileobj=archive, mode="w") as tar:
                info = tarfile.TarInfo("nginx.conf")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            container.put_archive("/etc/nginx", archive.getvalue())
            container.start()
        else:
            engine_client.containers.run(**kwargs)


def cleanup(engine_client: Any, deployment: str) -> int:
    """Remove only this deployment's containers and network; returns how many containers."""
    found = engine_client.containers.list(all=True, filters={"label": f"{LABEL}={deployment}"})
    for container in found:
        container.stop(timeout=40)
        container.remove()
    for network in engine_client.networks.list(filters={"label": f"{LABEL}={deployment}"}):
        network.remove()
    return len(found)
