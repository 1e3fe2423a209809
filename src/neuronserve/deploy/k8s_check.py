"""``neuronserve k8s check DIR``: render a Kustomize base and validate it offline.

1. ``kubectl kustomize DIR`` renders it, as ``kubectl apply -k`` would.
2. Every object is validated against the Kubernetes schemas of one version, strictly (an unknown
   field is an error), with PyPI ``kubernetes-validate``; the custom resources (KEDA's
   ScaledObject, the Prometheus operator's PodMonitor) against the schemas their projects publish
   (``data/crds``), made strict the same way.
3. checkov's Kubernetes policies run on the rendered objects; a check an object cannot meet is
   skipped in its own annotations, with the reason.
Nothing reaches a cluster.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from neuronserve.deploy.k8s import documents

DEFAULT_KUBERNETES_VERSION = "1.32"


class CheckError(RuntimeError):
    """A tool the check needs is missing or failed to run; the message says what to install."""


@dataclass
class CheckReport:
    objects: list[str] = field(default_factory=list)
    schema_errors: list[str] = field(default_factory=list)
    checkov_failed: list[str] = field(default_factory=list)
    checkov_passed: int = 0
    checkov_skipped: int = 0

    @property
    def ok(self) -> bool:
        return not self.schema_errors and not self.checkov_failed

    def text(self) -> str:
        lines = [f"rendered {len(self.objects)} objects: {', '.join(self.objects)}"]
        lines += [f"schema: {e}" for e in self.schema_errors] or ["schema: every object is valid (strict)"]
        lines.append(
            f"checkov: {self.checkov_passed} passed, {len(self.checkov_failed)} failed, "
            f"{self.checkov_skipped} skipped (reasons in the objects' annotations)"
        )
        lines += [f"checkov failed: {f}" for f in self.checkov_failed]
        return "\n".join(lines)


def render(directory: Path, kubectl: str = "kubectl") -> str:
    if shutil.which(kubectl) is None:
        raise CheckError(f"{kubectl} not found: install kubectl (it renders with its built-in kustomize)")
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False, timeout=120
    )
    if done.returncode != 0:
        raise CheckError(f"kubectl kustomize {directory} failed: {done.stderr.strip()}")
    return done.stdout


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the published openAPIV3Schema, strict (see :func:`strict`)."""
    out = {}
    for entry in resources.files("neuronserve").joinpath("data/crds").iterdir():
        if entry.name.endswith(".json"):
            doc = json.loads(entry.read_text())
            out[(f"{doc['group']}/{doc['version']}", doc["kind"])] = strict(doc["schema"])
    return out


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones (unless it keeps
    unknown fields on purpose), as the API server's strict field validation does."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def validate(obj: Mapping[str, Any], kubernetes_version: str) -> list[str]:
    """Every schema error of one object (empty when valid)."""
    try:
        import jsonschema
        import kubernetes_validate
    except ImportError:
        raise CheckError("kubernetes-validate is not installed: pip install kubernetes-validate") from None
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    crd = crd_schemas().get((str(obj.get("apiVersion")), str(obj.get("kind"))))
    if crd is not None:
        body = {k: v for k, v in obj.items() if k != "metadata"}  # metadata: the API server's own schema
        validator = jsonschema.Draft7Validator(crd)
        return [
            f"{where}: {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in validator.iter_errors(body)
        ]
    try:
        kubernetes_validate.validate(dict(obj), kubernetes_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [
            f"{where}: no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes {kubernetes_version}"
        ]
    except kubernetes_validate.ValidationError as exc:
        return [f"{where}: {'.'.join(map(str, exc.path)) or '(root)'}: {exc.message}"]
    return []


def find_checkov(given: str | None) -> str:
    """``--checkov``, else $NEURONSERVE_CHECKOV, else checkov on PATH, else the repository's
    tools venv (``make test`` puts it in .venv-tools, apart from the project's dependencies)."""
    for candidate in (given, os.environ.get("NEURONSERVE_CHECKOV"), shutil.which("checkov")):
        if candidate:
            return candidate
    beside = Path(sys.prefix).parent / ".venv-tools" / "bin" / "checkov"
    if beside.is_file():
        return str(beside)
    raise CheckError(
        "checkov not found: install it in a venv of its own (python3 -m venv .venv-tools && "
        ".venv-tools/bin/pip install 'checkov>=3.2,<4'), or pass --checkov PATH"
    )


def run_checkov(rendered: str, checkov: str) -> tuple[int, list[str], int]:
    """(passed, failed as 'CHECK object: name', skipped) of checkov's Kubernetes policies."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rendered.yaml"
        path.write_text(rendered)
        done = subprocess.run(
            [
                checkov,
                "-f",
                str(path),
                "--framework",
                "kubernetes",
                "--skip-download",
                "--quiet",
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise CheckError(
            f"checkov did not report (exit {done.returncode}): {done.stderr.strip()[-500:]}"
        ) from None
    if isinstance(result, list):
        result = next((r for r in result if r.get("check_type") == "kubernetes"), {})
    summary = result.get("summary", {})
    failed = [
        f"{c['check_id']} {c.get('resource', '?')}: {c.get('check_name', '')}"
        for c in result.get("results", {}).get("failed_checks", [])
    ]
    return int(summary.get("passed", 0)), failed, int(summary.get("skipped", 0))


def check(
    directory: Path, *, kubernetes_version: str = DEFAULT_KUBERNETES_VERSION, checkov: str | None = None
) -> CheckReport:
    rendered = render(directory)
    report = CheckReport()
    for obj in documents(rendered):
        report.objects.append(f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}")
        report.schema_errors += validate(obj, kubernetes_version)
    report.checkov_passed, report.checkov_failed, report.checkov_skipped = run_checkov(
        rendered, find_checkov(checkov)
    )
    return report
