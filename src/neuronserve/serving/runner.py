"""``neuronserve serve``: run one server, under gunicorn (production) or uvicorn (development)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from neuronserve.config import Settings, load_settings


def serve_overrides(
    *,
    port: int | None,
    cores: str | None,
    copies: int | None,
    name: str | None,
    artifacts: str | None,
    mode: str | None,
) -> list[str]:
    """Command-line shortcuts as ``--set`` assignments."""
    pairs = {
        "serve.port": port,
        "serve.cores": cores,
        "serve.models_per_server": copies,
        "serve.name": name,
        "serve.artifacts": artifacts,
        "serve.mode": mode,
    }
    return [f"{key}={value}" for key, value in pairs.items() if value is not None]


def run_uvicorn(settings: Settings) -> int:
    import uvicorn

    from neuronserve.serving.app import create_app
    from neuronserve.serving.logs import configure_logging
    from neuronserve.serving.worker import HTTP_PROTOCOL

    configure_logging()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.serve.host,
        port=settings.serve.port,
        lifespan="on",
        http=HTTP_PROTOCOL,
        proxy_headers=False,
        access_log=False,
        log_config=None,
        timeout_keep_alive=75,
        timeout_graceful_shutdown=int(settings.serve.drain_timeout_s) + 5,
    )
    server = uvicorn.Server(config)
    app.state.request_exit = lambda: setattr(server, "should_exit", True)
    server.run()
    if not server.started:
        return 1
    return int(getattr(app.state, "exit_code", 0))  # non-zero when a copy failed (see app.py)


def gunicorn_command(settings: Settings, python: str = sys.executable) -> list[str]:
    """The gunicorn command line for one server (one worker: it owns its cores exclusively)."""
    s = settings.serve
    return [
        python,
        "-m",
        "gunicorn",
        "neuronserve.serving.app:app_from_environment()",
        "--worker-class",
        "neuronserve.serving.worker.Worker",
        "--workers",
        "1",
        "--bind",
        f"{s.host}:{s.port}",
        "--graceful-timeout",
        str(int(s.drain_timeout_s) + 10),
        # The worker's heartbeat; an orphaned worker (its master killed) also exits within this.
        "--timeout",
        "30",
        "--keep-alive",
        "75",
        "--log-level",
        "info",
    ]


def run(config: str | None, overrides: Sequence[str]) -> int:
    """Validate settings here (errors surface before any fork), then run the server."""
    settings = load_settings(config, overrides=overrides)
    if settings.serve.mode == "uvicorn":
        return run_uvicorn(settings)
    env = dict(os.environ)
    # The worker rebuilds the same settings: same file, same environment, --set as variables.
    if config is not None or "NEURONSERVE_CONFIG" not in env:
        cfg = Path(config) if config else settings.base_dir / "config.properties"
        if cfg.is_file():
            env["NEURONSERVE_CONFIG"] = str(cfg.resolve())
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.strip().partition(".")
        env[f"NEURONSERVE_{section.upper()}__{name.upper()}"] = value
    cmd = gunicorn_command(settings)
    os.execvpe(cmd[0], cmd, env)  # noqa: S606 - replace this process with gunicorn, our own argv
    return 0  # pragma: no cover - exec does not return
