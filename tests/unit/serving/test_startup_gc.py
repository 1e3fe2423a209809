"""A server that owns its process hides start-up's objects from the garbage collector once it is
ready; an app run from another thread (a test client) leaves the collector alone."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuronserve.serving.app import create_app
from tests.conftest import make_settings, ready_client, trace_tiny


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """A server run in this process pins it (CPU affinity, torch threads) and installs its SIGTERM
    handler; all of it is undone after, or every process the session starts later (a deployment's
    supervisord, its servers) would inherit one CPU."""
    import torch

    gc.unfreeze()
    previous = signal.getsignal(signal.SIGTERM)
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    yield
    gc.unfreeze()  # the rest of the test session collects as usual
    signal.signal(signal.SIGTERM, previous)
    os.sched_setaffinity(0, affinity)
    torch.set_num_threads(threads)


def _settings(tmp_path: Path) -> object:
    artifacts = trace_tiny(tmp_path).directory
    return make_settings(tmp_path, serve__artifacts=str(artifacts), serve__cores="0")


def test_a_server_in_its_own_main_thread_freezes_start_up_objects_when_ready(
    tmp_path: Path, unfrozen: None
) -> None:
    app = create_app(_settings(tmp_path))  # type: ignore[arg-type]
    engine = app.state.registry
    seen: dict[str, int] = {}

    async def main() -> None:
        async with app.router.lifespan_context(app):
            seen["before_ready"] = gc.get_freeze_count()
            deadline = time.monotonic() + 60
            while not engine.ready:
                assert time.monotonic() < deadline, "the server did not get ready"
                await asyncio.sleep(0.01)  # poll readiness
            seen["ready"] = gc.get_freeze_count()

    asyncio.run(main())
    assert seen["before_ready"] == 0
    # Everything imported so far (torch alone is hundreds of thousands of objects) is frozen.
    assert seen["ready"] > 100_000


def test_an_app_run_by_a_test_client_leaves_the_collector_alone(tmp_path: Path, unfrozen: None) -> None:
    with ready_client(_settings(tmp_path)) as client:  # type: ignore[arg-type]
        assert client.post("/predict", json={"inputs": "hello"}).status_code == 200
    assert gc.get_freeze_count() == 0
