"""Which extra of the package each command needs, and the one line that says so when it is missing.

The dependencies are split by job (pyproject.toml): a serve image has no plotting or Docker SDK,
a load client no torch. A command run without its extra fails on an import; this turns that into
the install command instead of a traceback.
"""

from __future__ import annotations

# neuronserve <command> -> the extra that carries what it imports (None: the base install).
COMMAND_EXTRAS: dict[str, str | None] = {
    "serve": "serve",
    "monitor": "serve",
    "trace": "trace",
    "deploy": "deploy",
    "status": "deploy",
    "cleanup": "deploy",
    "top": "deploy",
    "image": "deploy",
    "dashboards": "deploy",
    "bench": "bench",
    "k8s": "k8s",
    "tune": "tune",
    "acceptance": "tune",
    "doctor": None,
    "manifest": None,
    "config": None,
}


def missing_extra(exc: ModuleNotFoundError, command: str) -> str | None:
    """The message for a third-party module ``command`` could not import; None for our own
    modules (a broken install or a bug, which deserves its traceback)."""
    module = (exc.name or "").split(".")[0]
    if not module or module == "neuronserve":
        return None
    extra = COMMAND_EXTRAS.get(command)
    if extra is None:
        return f"{command}: the Python package {module!r} is missing; reinstall neuronserve"
    return (
        f"{command} needs the {extra!r} extra, which provides {module!r}: "
        f"pip install 'neuronserve[{extra}]' (from a checkout: pip install '.[{extra}]')"
    )
