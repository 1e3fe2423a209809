"""One streamed request to an OpenAI-compatible generative endpoint, timed chunk by chunk.

Definitions (vLLM's ``benchmarks/serve.py``, genai-perf and LLMPerf measure the same):

- TTFT: the first chunk with content arrives - the request was sent (chunks without content, such
  as a chat stream's first one that only names the role, are not content);
- E2EL: the last chunk with content arrives - sent;
- ITL: every gap between two chunks with content (a chunk may carry several tokens);
- output tokens: the server's ``usage.completion_tokens`` (asked for with
  ``stream_options.include_usage``), else the model's tokenizer over the generated text;
- TPOT: (E2EL - TTFT) / (output tokens - 1), for answers of two tokens or more.

The stream is read as server-sent events, ``data:`` line by line up to ``data: [DONE]``. A request
succeeds only when the status is 200, content arrived and the stream ended with ``[DONE]``;
everything else is recorded with its class: ``http_<code>``, ``timeout`` (the client's whole-
request limit), ``connection`` (no answer), ``truncated`` (the stream stopped before ``[DONE]``),
``stream_error`` (an error event inside the stream), ``bad_chunk`` (not JSON), ``no_content``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

Api = Literal["openai-chat", "openai-completions"]
ABORTED = {"abort", "error"}  # finish reasons of answers the engine did not finish
ROUTES: dict[str, str] = {"openai-chat": "/v1/chat/completions", "openai-completions": "/v1/completions"}


class SSEParser:
    """Server-sent events from bytes as they arrive: each event's ``data`` (its ``data:`` lines
    joined by newlines); comments and other fields are skipped."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> Iterator[str]:
        self._buffer += chunk
        while True:
            cut = self._buffer.find(b"\n")
            if cut < 0:
                return
            line = self._buffer[:cut].rstrip(b"\r").decode("utf-8", errors="replace")
            self._buffer = self._buffer[cut + 1 :]
            if not line:  # an event ends
                if self._data:
                    yield "\n".join(self._data)
                    self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
            # ":" comments (pings), event:, id:, retry: carry no data here

    def close(self) -> Iterator[str]:
        """What an unterminated last event held (a stream cut without its blank line)."""
        if self._buffer.strip():
            yield from self.feed(b"\n")
        if self._data:
            yield "\n".join(self._data)
            self._data = []


@dataclass
class StreamRecord:
    """One request as the client saw it; times in seconds from the step's start."""

    index: int  # the prompt's
    intended_s: float
    sent_s: float
    end_s: float = math.nan  # when the client was done with it (answer, error or timeout)
    status: int = 0
    error: str = ""
    detail: str = ""  # the error's message (never the prompt or the answer)
    ttft_s: float = math.nan
    e2el_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    tokens_from: str = ""  # usage, tokenizer or chunks
    prompt_tokens: int = 0
    chunks: int = 0
    finish_reason: str = ""
    text: str = field(default="", repr=False)  # kept only to count tokens, never written

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def tpot_s(self) -> float:
        if self.output_tokens < 2 or math.isnan(self.ttft_s):
            return math.nan
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)


def request_body(
    api: Api,
    model: str,
    prompt: str,
    max_tokens: int,
    *,
    ignore_eos: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The body vLLM's own client sends for ``api``, greedy only when ``extra`` says so."""
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    if api == "openai-chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        body["max_completion_tokens"] = max_tokens
    else:
        body["prompt"] = prompt
        body["max_tokens"] = max_tokens
    if ignore_eos:  # vLLM's extension: exactly max_tokens, as benchmarks with fixed lengths need
        body["ignore_eos"] = True
    body.update(extra or {})
    return body


def _content(api: Api, choice: dict[str, Any]) -> str:
    if api == "openai-chat":
        delta = choice.get("delta") or {}
        return str(delta.get("content") or "")
    return str(choice.get("text") or "")


class _Stream:
    """The reading of one answer into its record (see :func:`stream_request`)."""

    def __init__(self, api: Api, record: StreamRecord, clock: Callable[[], float], sent: float) -> None:
        self.api, self.record, self.clock, self.sent = api, record, clock, sent
        self.last = math.nan
        self.pieces: list[str] = []
        self.done = False

    async def read(
        self, client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
    ) -> None:
        record = self.record
        async with client.stream("POST", url, json=body, headers=headers) as response:
            record.status = response.status_code
            if response.status_code != 200:
                said = (await response.aread())[:300].decode("utf-8", errors="replace")
                record.error, record.detail = f"http_{response.status_code}", _message(said)
                return
            parser = SSEParser()
            async for chunk in response.aiter_bytes():  # decoded, should a proxy compress
                now = self.clock()
                for data in parser.feed(chunk):
                    if not self.take(data, now):
                        return
            for data in parser.close():
                if not self.take(data, self.clock()):
                    return

    def take(self, data: str, now: float) -> bool:
        """One event's data; False when the stream is over (done, or an error recorded)."""
        record = self.record
        if data.strip() == "[DONE]":
            self.done = True
            return False
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        if not isinstance(event, dict):  # its size only: it may hold the answer's text
            record.error, record.detail = "bad_chunk", f"not a JSON object ({len(data)} bytes)"
            return False
        if event.get("error"):
            record.error, record.detail = "stream_error", _message(json.dumps(event["error"]))
            return False
        try:
            return self._event(event, now)
        except (AttributeError, TypeError, ValueError) as exc:  # a chunk of another shape
            record.error, record.detail = "bad_chunk", f"unexpected chunk shape ({type(exc).__name__})"
            return False

    def _event(self, event: dict[str, Any], now: float) -> bool:
        record = self.record
        for choice in event.get("choices") or []:
            text = _content(self.api, choice)
            if text:
                if math.isnan(record.ttft_s):
                    record.ttft_s = now - self.sent
                else:
                    record.itl_s.append(now - self.last)
                self.last = now
                record.chunks += 1
                self.pieces.append(text)
            if choice.get("finish_reason"):
                record.finish_reason = str(choice["finish_reason"])
                if record.finish_reason in ABORTED:  # the engine gave up on it: no answer
                    record.error, record.detail = "aborted", f"finish_reason {record.finish_reason}"
                    return False
        usage = event.get("usage")
        if isinstance(usage, dict):
            if usage.get("completion_tokens") is not None:
                record.output_tokens, record.tokens_from = int(usage["completion_tokens"]), "usage"
            if usage.get("prompt_tokens") is not None:
                record.prompt_tokens = int(usage["prompt_tokens"])
        return True

    def finish(self) -> None:
        record = self.record
        record.text = "".join(self.pieces)
        if not record.error:
            if not self.done:
                record.error, record.detail = "truncated", "the stream ended without data: [DONE]"
            elif not self.pieces:
                record.error, record.detail = "no_content", "the stream carried no content"
        if not math.isnan(self.last):
            record.e2el_s = self.last - self.sent


async def stream_request(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    *,
    api: Api,
    record: StreamRecord,
    timeout_s: float,
    clock: Callable[[], float] = time.perf_counter,
    origin: float = 0.0,
) -> StreamRecord:
    """Send one request and time its stream into ``record`` (whose ``sent_s`` is set here,
    relative to ``origin``); never raises for what the server or the network does."""
    sent = clock()
    record.sent_s = sent - origin
    stream = _Stream(api, record, clock, sent)
    try:
        await asyncio.wait_for(stream.read(client, url, body, headers), timeout_s)
    except (TimeoutError, asyncio.TimeoutError, httpx.TimeoutException):
        record.error, record.detail = "timeout", f"no complete answer within {timeout_s:g} s"
    except httpx.HTTPError as exc:
        # Nothing came back, or the stream was cut (a copy died mid-answer).
        if not record.error:
            record.error = (
                "truncated"
                if record.status == 200
                else f"http_{record.status}"
                if record.status
                else "connection"
            )
        record.detail = record.detail or f"{type(exc).__name__}: {exc}"[:200]
    stream.finish()
    record.end_s = clock() - origin
    return record


def _message(text: str) -> str:
    """An error body's message (JSON ``message``/``error``/``detail`` when there is one), never
    what a validation error echoes of the request (pydantic's ``input``: the prompt)."""
    try:
        data = json.loads(text)
    except ValueError:
        return f"a body of {len(text)} bytes that is not JSON"
    if isinstance(data, dict):
        inner = data.get("error", data)
        if isinstance(inner, dict):
            said = inner.get("message") or inner.get("detail") or inner.get("type") or "no message"
            if isinstance(said, list):  # pydantic: where and what, without the input
                said = "; ".join(
                    f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg', '')}"
                    for d in said
                    if isinstance(d, dict)
                )
            return str(said)[:200]
        return str(inner)[:200]
    return "an error body of another shape"
