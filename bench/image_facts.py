"""Facts of the cpu serving image on a real Docker engine: its size, how long it builds, how fast
a container of it gets ready.

    DOCKER_HOST=unix:///run/neuronserve-docker/docker.sock python bench/image_facts.py \\
        [--base-image IMAGE] [--artifacts DIR] [--runs 3] [--skip-cold]

(``scripts/docker-engine.sh start`` prints that DOCKER_HOST.) It builds ``serve-cpu`` from
--base-image (default: deploy.docker_base_image, else the Dockerfile's python:3.11-slim) as
``neuronserve image build serve`` does, and prints:
- the image size without and with the bundled model (EXTRAS=serve,trace and serve,trace,bundled);
- the build time cold (``--no-cache``: every package downloaded and installed again) and cached
  (nothing changed: every step from the cache), --runs each but the cold one (once; its time is
  mostly the package index's);
- container start to ready: ``docker run`` of the image with --artifacts (default
  trace-models/all-MiniLM-L6-v2/cpu, traced first if missing) mounted read-only, until /ready
  answers 200 through the published port, --runs times; the median and every run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.servers import free_port  # noqa: E402

from neuronserve import containers  # noqa: E402
from neuronserve.backends import BackendKind  # noqa: E402
from neuronserve.config import load_settings  # noqa: E402

CPU = BackendKind("cpu")


def _build(engine: containers.Engine, base: str, extras: str, tag: str, *, no_cache: bool = False) -> float:
    started = time.monotonic()
    containers.build_image(
        engine, REPO, "serve", CPU, base_image=base, build_args={"EXTRAS": extras}, tag=tag, no_cache=no_cache
    )
    return time.monotonic() - started


def _ready_s(engine: containers.Engine, tag: str, artifacts: Path) -> float:
    assert engine.client is not None
    port = free_port()
    started = time.monotonic()
    container = engine.client.containers.run(
        tag,
        detach=True,
        ports={"8080/tcp": ("127.0.0.1", port)},
        volumes={str(artifacts.resolve()): {"bind": "/artifacts", "mode": "ro"}},
        environment={"NEURONSERVE_SERVE__MODELS_PER_SERVER": "1"},
    )
    try:
        deadline = started + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass  # not listening yet
            container.reload()
            if container.status == "exited":
                raise SystemExit(f"the container exited:\n{container.logs().decode()[-3000:]}")
            time.sleep(0.1)  # poll: readiness is what is measured
        raise SystemExit("not ready within 300 s")
    finally:
        container.remove(force=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-image", default="")
    parser.add_argument("--artifacts", type=Path, default=REPO / "trace-models" / "all-MiniLM-L6-v2" / "cpu")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-cold", action="store_true", help="no --no-cache build")
    args = parser.parse_args()
    engine = containers.docker_engine()
    if engine.client is None:
        raise SystemExit(
            f"{engine.reason}: start one with scripts/docker-engine.sh start and set DOCKER_HOST"
        )
    base = args.base_image or load_settings(REPO / "config.properties").deploy.docker_base_image
    print(f"engine: {engine.reason}; base image: {base or 'python:3.11-slim (the Dockerfile default)'}")
    if not (args.artifacts / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "neuronserve.cli", "trace", "--quiet"], cwd=REPO, check=True)

    plain, bundled = "neuronserve-serve-cpu:bench", "neuronserve-serve-cpu:bench-bundled"
    cold = None if args.skip_cold else _build(engine, base, "serve,trace", plain, no_cache=True)
    cached = [_build(engine, base, "serve,trace", plain) for _ in range(args.runs)]
    _build(engine, base, "serve,trace,bundled", bundled)
    sizes = {tag: engine.client.images.get(tag).attrs["Size"] for tag in (plain, bundled)}
    ready = [_ready_s(engine, plain, args.artifacts) for _ in range(args.runs)]

    print(f"image size, serve-cpu (serve,trace):         {sizes[plain] / 1e9:.2f} GB")
    print(f"image size, serve-cpu with the bundled model: {sizes[bundled] / 1e9:.2f} GB")
    if cold is not None:
        print(f"build, cold (--no-cache):  {cold:.0f} s")
    print(
        f"build, cached:             median {statistics.median(cached):.1f} s  ({', '.join(f'{c:.1f}' for c in cached)})"
    )
    print(
        f"container start to ready:  median {statistics.median(ready):.1f} s  ({', '.join(f'{r:.1f}' for r in ready)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
