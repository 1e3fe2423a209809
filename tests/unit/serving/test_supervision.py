"""Supervised copies: a copy that cannot load or dies stops the server; failing batches take a
copy out of rotation (server unready) until its probe succeeds. Real engine, tiny cpu model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from neuronserve.backends import cpu
from neuronserve.backends.cpu import CpuBackend
from neuronserve.serving.batcher import Batcher
from neuronserve.serving.engine import Engine
from neuronserve.serving.errors import ServeError
from neuronserve.serving.metrics import ServerMetrics
from neuronserve.serving.work import InferRequest
from tests.conftest import make_settings, trace_tiny


def _engine(tmp_path: Path, **values: str) -> Engine:
    artifacts = trace_tiny(tmp_path, trace__batch_sizes="1,2").directory
    settings = make_settings(tmp_path, serve__artifacts=str(artifacts), serve__cores="0", **values)
    return Engine(settings, ServerMetrics("test"))


async def _until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)  # poll interval


def _texts(texts: list[str]) -> InferRequest:
    return InferRequest(texts=tuple(texts), timeout_ms=30_000)


def _run(engine: Engine, scenario: Callable[[Engine, list[str]], Awaitable[None]]) -> list[str]:
    fatal: list[str] = []

    async def main() -> None:
        engine.on_fatal = fatal.append
        engine.start(threads_per_copy=1)
        try:
            await scenario(engine, fatal)
        finally:
            engine.close()

    asyncio.run(main())
    return fatal


def _gate_tokenization(monkeypatch: pytest.MonkeyPatch) -> list[asyncio.Event]:
    """Tokenization waits for the event the scenario appends (created inside its loop)."""
    gates: list[asyncio.Event] = []
    real = Engine._tokenize

    async def slow(self: Engine, inputs: Any, **options: Any) -> Any:
        await gates[0].wait()
        return await real(self, inputs, **options)

    monkeypatch.setattr(Engine, "_tokenize", slow)
    return gates


def test_a_copy_that_cannot_load_stops_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any) -> Any:
        raise RuntimeError("PytorchStreamReader failed reading zip archive")

    monkeypatch.setattr(CpuBackend, "load", broken)

    async def scenario(engine: Engine, fatal: list[str]) -> None:
        await _until(lambda: bool(fatal))
        assert engine.state == "failed" and not engine.ready
        with pytest.raises(ServeError) as refused:
            engine.check_available()
        assert refused.value.status == 503

    (message,) = _run(_engine(tmp_path), scenario)
    assert message == "copy 0 failed to load: RuntimeError: PytorchStreamReader failed reading zip archive"


def test_a_copy_that_dies_while_serving_stops_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Batcher.next_batch
    calls = {"n": 0}

    def dying(self: Batcher[Any]) -> Any:
        calls["n"] += 1
        if calls["n"] > 1:  # the first batch runs; the copy's loop then breaks outside a batch
            raise MemoryError("cannot allocate")
        return real(self)

    monkeypatch.setattr(Batcher, "next_batch", dying)

    async def scenario(engine: Engine, fatal: list[str]) -> None:
        await _until(lambda: engine.ready)
        result = await engine.infer(_texts(["hello"]))
        assert len(result.outputs) == 1
        await _until(lambda: bool(fatal))
        assert engine.state == "failed"

    (message,) = _run(_engine(tmp_path), scenario)
    assert message == "copy 0 died: MemoryError: cannot allocate"


class _Flaky:
    """A loaded model that fails while ``failing`` is set (a device error, say)."""

    failing = False

    def __init__(self, model: Any) -> None:
        self.model = model

    def run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if _Flaky.failing:
            raise RuntimeError("device error")
        out: tuple[torch.Tensor, ...] = self.model.run(inputs)
        return out


def test_failing_batches_take_the_copy_out_of_rotation_until_its_probe_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = CpuBackend.load
    monkeypatch.setattr(CpuBackend, "load", lambda self, *a: _Flaky(real(self, *a)))
    monkeypatch.setattr(_Flaky, "failing", False)

    async def scenario(engine: Engine, fatal: list[str]) -> None:
        await _until(lambda: engine.ready)
        _Flaky.failing = True
        for attempt in range(3):
            with pytest.raises(ServeError) as failed:
                await engine.infer(_texts([f"text {attempt}"]))
            assert failed.value.status == 500
        await _until(lambda: engine.state == "unhealthy")
        assert engine.unhealthy == {0: "3 batches in a row failed, last: RuntimeError: device error"}
        assert engine.metrics.copies_unhealthy._value.get() == 1
        with pytest.raises(ServeError) as refused:  # nginx routes the next requests elsewhere
            engine.check_available()
        assert refused.value.status == 503 and "copy 0 is failing" in refused.value.message
        _Flaky.failing = False  # the device recovers: the next probe succeeds
        await _until(lambda: engine.ready, timeout_s=10)
        result = await engine.infer(_texts(["back"]))
        assert len(result.outputs) == 1
        assert fatal == []

    _run(_engine(tmp_path, serve__max_failed_batches="3"), scenario)


def test_inputs_still_being_tokenized_count_against_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst cannot start unbounded tokenization work before the queue says no."""
    gates = _gate_tokenization(monkeypatch)  # long texts, say

    async def scenario(engine: Engine, fatal: list[str]) -> None:
        gates.append(asyncio.Event())
        await _until(lambda: engine.ready)
        texts = [f"text {i}" for i in range(4)]
        admitted = [asyncio.create_task(engine.infer(_texts(texts))) for _ in range(2)]
        await _until(lambda: engine._admitting == 8)
        with pytest.raises(ServeError) as refused:  # at once, without waiting for the tokenizer
            await engine.infer(_texts(["one more"]))
        assert refused.value.status == 429 and int(refused.value.headers["Retry-After"]) >= 1
        assert "queue full (8 of 8 inputs waiting)" in refused.value.message
        gates[0].set()
        assert [len((await task).outputs) for task in admitted] == [4, 4]
        assert engine._admitting == 0 and fatal == []

    _run(_engine(tmp_path, serve__max_queue="8"), scenario)


def test_a_client_that_leaves_while_its_inputs_are_tokenized_is_not_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gates = _gate_tokenization(monkeypatch)  # a large request

    async def scenario(engine: Engine, fatal: list[str]) -> None:
        gates.append(asyncio.Event())
        await _until(lambda: engine.ready)

        async def receive() -> dict[str, Any]:  # the body was read; then the client is gone
            return {"type": "http.disconnect"}

        texts = [f"text {i}" for i in range(8)]
        task = asyncio.create_task(engine.infer(_texts(texts), receive=receive))
        await _until(lambda: engine._admitting == 8)
        gates[0].set()
        assert await task is None  # answered as "client closed", not run
        await engine.infer(_texts(["after"]))  # the copy moves on
        sample = engine.metrics.server.registry.get_sample_value
        # A batch's metrics are recorded once its answers are out, a turn of the loop after them.
        await _until(lambda: sample("neuronserve_copy_items_total", {"model": "tiny", "copy": "0"}) == 1)
        assert sample("neuronserve_inputs_dropped_total", {"model": "tiny", "reason": "cancelled"}) == 8
        assert fatal == []

    _run(_engine(tmp_path), scenario)


def test_the_awaiting_handler_runs_before_the_batch_and_request_bookkeeping(tmp_path: Path) -> None:
    """What follows a request's answer (its batch's metrics and costs, the request's own
    bookkeeping) waits for the handler's step that sends its response, and then comes."""

    async def scenario(engine: Engine, fatal: list[str]) -> None:
        await _until(lambda: engine.ready)
        sample = engine.metrics.server.registry.get_sample_value
        items = {"model": "tiny", "copy": "0"}
        result = await engine.infer(_texts(["one"]))
        assert len(result.outputs) == 1  # a handler would build and send its response here
        assert sample("neuronserve_copy_items_total", items) is None and not engine.idle
        await asyncio.sleep(0)  # one turn of the loop
        assert sample("neuronserve_copy_items_total", items) == 1
        assert sample("neuronserve_input_tokens_total", {"model": "tiny"}) == result.tokens
        assert engine.idle and fatal == []

    _run(_engine(tmp_path), scenario)


def test_a_request_answered_as_the_engine_closes_leaves_no_timer_behind(tmp_path: Path) -> None:
    """Its bookkeeping comes after the close: it must not arm the idle memory trim (which would
    run on the closed tokenizer pool)."""

    async def scenario(engine: Engine, fatal: list[str]) -> None:
        await _until(lambda: engine.ready)
        await engine.infer(_texts(["one"]))
        engine.close()  # the request's bookkeeping is a turn of the loop later
        await asyncio.sleep(0)
        assert engine.idle and engine._trim_timer is None and fatal == []

    _run(_engine(tmp_path), scenario)


def test_a_token_bound_that_cannot_hold_one_request_is_refused(tmp_path: Path) -> None:
    from neuronserve.config import ConfigError

    with pytest.raises(ConfigError, match=r"serve\.max_queue_tokens=100 cannot hold one request"):
        _engine(tmp_path, serve__max_queue_tokens="100")


def test_a_copy_that_finishes_loading_after_the_server_stopped_goes_quietly(tmp_path: Path) -> None:
    """A server stopped while its copies still load (a client that leaves at once, a SIGTERM at
    boot): the copy that finishes afterwards has no loop to tell, and must not raise."""
    engine = _engine(tmp_path)

    async def main() -> None:
        engine.start(threads_per_copy=1)
        engine.close()  # before any copy is ready; asyncio.run then closes the loop

    asyncio.run(main())
    for thread in engine.copy_set._threads:
        thread.join(timeout=60)  # a raise in the thread fails the test (pytest -W error)
    assert not any(thread.is_alive() for thread in engine.copy_set._threads)


class _Recording:
    """A loaded model that records the intra-op threads of each call (torch's count; an ONNX
    model's, the threads of the session it picks); with a barrier, a call waits until as many
    calls run at once (or the barrier breaks)."""

    threads: ClassVar[list[int]] = []
    barrier: ClassVar[threading.Barrier | None] = None

    def __init__(self, model: Any) -> None:
        self.model = model

    def run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        _Recording.threads.append(getattr(self.model, "session_threads", torch.get_num_threads)())
        if _Recording.barrier is not None:
            _Recording.barrier.wait(timeout=10)
        out: tuple[torch.Tensor, ...] = self.model.run(inputs)
        return out


@pytest.mark.parametrize("engine_name", ["torchscript", "onnxruntime"])
def test_a_lone_request_runs_on_every_core_and_concurrent_ones_on_one_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine_name: str
) -> None:
    """Two copies on two CPUs: a request alone gets both as intra-op threads; two requests at
    once run one per copy, one thread each; nothing about either changes the results. ONNX
    Runtime's threads are a session's: the copies share a session of each count."""
    real = CpuBackend.load
    monkeypatch.setattr(CpuBackend, "load", lambda self, *a: _Recording(real(self, *a)))
    _Recording.threads = []
    artifacts = trace_tiny(tmp_path, trace__batch_sizes="1,2", trace__cpu_engine=engine_name).directory
    settings = make_settings(tmp_path, serve__artifacts=str(artifacts), serve__cores="0-1")
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: None)  # whatever limit this host has
    engine = Engine(settings, ServerMetrics("test"))
    assert engine.copies == 2 and engine.copy_set.lend_cores  # one copy per CPU by default

    async def scenario(engine: Engine, _fatal: list[str]) -> None:
        await _until(lambda: engine.ready and engine.batcher.waiting_copies == 2)
        _Recording.threads.clear()
        alone = await engine.infer(_texts(["hello"]))
        assert _Recording.threads == [2]
        await _until(lambda: engine.batcher.waiting_copies == 2)  # both copies back for work
        _Recording.threads.clear()
        _Recording.barrier = threading.Barrier(2)  # both calls at once, or it breaks
        pair = await engine.infer(_texts(["hello", "hello"]))
        _Recording.barrier = None
        assert _Recording.threads == [1, 1]  # shared out: one input per copy, one core each
        assert torch.allclose(torch.tensor(pair.outputs[0]), torch.tensor(alone.outputs[0]), atol=1e-5)

    _run(engine, scenario)


class _Counting:
    """A loaded model that counts its calls by shape."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.calls: dict[tuple[int, int], int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        shape = (inputs[0].shape[0], inputs[0].shape[1])
        self.calls[shape] = self.calls.get(shape, 0) + 1
        out: tuple[torch.Tensor, ...] = self.model.run(inputs)
        return out


@pytest.mark.parametrize("engine_name", ["torchscript", "onnxruntime"])
def test_copies_that_share_a_load_warm_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine_name: str
) -> None:
    """On cpu a server's copies share one load: it is warmed once, not once per copy (which
    doubled a default server's time to ready), and every copy still reports every shape's cost."""
    artifacts = trace_tiny(tmp_path, trace__batch_sizes="1,2", trace__cpu_engine=engine_name).directory
    settings = make_settings(
        tmp_path, serve__artifacts=str(artifacts), serve__cores="0", serve__models_per_server="3"
    )
    loads: list[_Counting] = []
    for loader in ("_load_file", "_load_onnx"):
        real = getattr(cpu, loader)

        def counting(*args: Any, _real: Any = real, **kwargs: Any) -> _Counting:
            loads.append(_Counting(_real(*args, **kwargs)))
            return loads[-1]

        monkeypatch.setattr(cpu, loader, counting)
    engine = Engine(settings, ServerMetrics("test"))
    assert engine.copies == 3

    async def scenario(engine: Engine, _fatal: list[str]) -> None:
        await _until(lambda: engine.ready)
        (loaded,) = loads  # one load for the three copies
        shapes = {(e.batch_size, e.sequence_length) for e in engine.manifest.shapes}
        assert loaded.calls == dict.fromkeys(shapes, 1)
        assert set(engine.copy_set.costs) == shapes

    _run(engine, scenario)
