"""What one request's inputs become on their way through the batcher, and how they come back.

A request of k inputs is k :class:`QueuedInput` work items sharing one :class:`Answer`: copies
fill the answer's values (through the event loop) and its future is set once, when the last
input lands. :class:`DisconnectWatch` cancels a request's queued items when its client leaves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from neuronserve.serving.batcher import WorkItem
from neuronserve.serving.tasks import ItemOptions
from neuronserve.serving.tokenization import Encoded

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


@dataclass(frozen=True)
class InferRequest:
    """One request's inputs as its protocol decoded them: texts, or (question, context) and
    (query, text) pairs, with the task's options for each. The ``*_field`` names are what the
    request calls each part, for the errors that name one."""

    texts: tuple[str, ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()
    options: tuple[ItemOptions, ...] = ()  # one per input; empty: the defaults for every input
    field: str = "inputs"
    truncate: bool = False
    truncate_hint: str = ""  # how this route asks for truncation (the refusal's advice); "": native's
    timeout_ms: int | None = None  # None: serve.request_timeout_ms
    timeout_field: str = "timeout"
    prompt_name: str | None = None  # None: the model's default prompt (embedding models)
    prompt_field: str = "prompt_name"

    @property
    def count(self) -> int:
        return len(self.pairs) if self.pairs else len(self.texts)

    def options_for(self, index: int) -> ItemOptions:
        return self.options[index] if self.options else _DEFAULT_OPTIONS


_DEFAULT_OPTIONS = ItemOptions()


@dataclass(frozen=True)
class InferResult:
    """Results in input order plus the timings the response headers report."""

    outputs: list[Any]
    queue_ms: float
    inference_ms: float
    batch_size: int
    tokens: int
    truncated: int = 0  # inputs cut to the largest compiled length

    def timing_headers(self) -> dict[str, str]:
        headers = {
            "x-queue-ms": f"{self.queue_ms:.3f}",
            "x-inference-ms": f"{self.inference_ms:.3f}",
            "x-batch-size": str(self.batch_size),
        }
        if self.truncated:  # said, never silent
            headers["x-truncated-inputs"] = str(self.truncated)
        return headers


class ExpiredError(Exception):
    """A request's deadline passed before all of its inputs were answered."""


class Answer:
    """One request's inputs, answered together (one future per request, not one per input)."""

    __slots__ = ("batch_size", "future", "inference_s", "queue_s", "remaining", "values")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.future: asyncio.Future[Answer] = loop.create_future()
        self.values: list[Any] = [None] * count
        self.remaining = count
        self.queue_s = 0.0
        self.inference_s = 0.0
        self.batch_size = 0

    def cancel(self) -> None:
        self.future.cancel()  # a no-op once answered

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def expire(self) -> None:
        self.fail(ExpiredError())


@dataclass(frozen=True, slots=True)
class QueuedInput:
    """A work item's payload: the tokenized input, the task's options for it, and where its
    result goes (its request's answer, at position ``slot``)."""

    encoded: Encoded
    options: ItemOptions
    answer: Answer
    slot: int


Item = WorkItem[QueuedInput]


class DisconnectWatch:
    """Cancels a request's queued work when its client disconnects (it is then never run).

    It reads ``receive`` until the disconnect: the first messages may be the body again (the
    middleware replays what it has read), which must not end the watch. The engine registers a
    request's work items with :meth:`add` before it queues them, so an item is marked cancelled
    (and dropped by the batcher before any copy takes it) whenever the client left first, also
    when it left while its inputs were being tokenized.
    """

    def __init__(self, receive: Receive) -> None:
        self.items: list[Item] = []
        self.disconnected = False
        self._task = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            continue
        self.disconnected = True
        cancel(self.items)

    def add(self, items: Iterable[Item]) -> None:
        added = list(items)
        self.items.extend(added)
        if self.disconnected:
            cancel(added)

    def close(self) -> None:
        self._task.cancel()


def cancel(items: Iterable[Item]) -> None:
    for item in items:
        item.cancelled = True  # the batcher drops it instead of dispatching it
        item.payload.answer.cancel()  # the request's answer: its awaiting handler stops waiting
