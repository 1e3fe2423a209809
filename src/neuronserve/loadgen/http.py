"""A lean HTTP/1.1 load engine: keep-alive connections over asyncio streams, pre-encoded requests.

A few tens of microseconds of client CPU per request, so a load client on the same 2-core
machine takes little from the server it measures. Every request produces a :class:`Record`,
including failures (status, timeout, connection) — nothing is dropped.

Closed loop: ``concurrency`` connections send back to back; latency runs from the send.
Open loop: requests start at Poisson arrival times whatever the server does, and latency runs
from each request's *intended* start, so a stalled server cannot hide its queue (no coordinated
omission). A request whose intended time passes while the client is at its in-flight cap is
recorded as a client-side error rather than silently delayed.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit


def auth_headers(key: str) -> dict[str, str]:
    """The header that carries the API key (none without one)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str, path: str) -> Target:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http":
            raise ValueError(f"{url}: only http:// targets are supported (nginx terminates TLS)")
        return cls(parts.hostname or "127.0.0.1", parts.port or 80, path)


@dataclass(frozen=True)
class Payload:
    """One request body and what it carries."""

    body: bytes
    tokens: int
    items: int = 1


@dataclass
class Record:
    """One request as the client saw it; times in seconds relative to the step's start."""

    intended_s: float
    sent_s: float
    latency_s: float
    status: int
    error: str  # "" on success, else http_<code>, timeout, connection, client_overload
    server: str
    queue_ms: float
    inference_ms: float
    batch_size: int
    tokens: int
    items: int
    target: str


def encode_request(target: Target, body: bytes, headers: dict[str, str]) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head = (
        f"POST {target.path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


class Connection:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, dict[str, str]]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.target.host, self.target.port)
        assert self.reader is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _record(
    *,
    intended: float,
    sent: float,
    done: float,
    status: int,
    error: str,
    headers: dict[str, str],
    payload: Payload,
    target: Target,
) -> Record:
    return Record(
        intended_s=intended,
        sent_s=sent,
        latency_s=done - intended,
        status=status,
        error=error,
        server=headers.get("x-server", f"{target.host}:{target.port}"),
        queue_ms=float(headers.get("x-queue-ms", "nan")),
        inference_ms=float(headers.get("x-inference-ms", "nan")),
        batch_size=int(headers.get("x-batch-size", "0") or 0),
        tokens=payload.tokens,
        items=payload.items,
        target=f"{target.host}:{target.port}",
    )


async def _send(conn: Connection, raw: bytes, timeout_s: float) -> tuple[int, str, dict[str, str]]:
    try:
        status, headers = await asyncio.wait_for(conn.request(raw), timeout_s)
    except asyncio.TimeoutError:  # a distinct class before Python 3.11
        conn.close()
        return 0, "timeout", {}
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        conn.close()
        return 0, "connection", {}
    return status, "" if status == 200 else f"http_{status}", headers


@dataclass(frozen=True)
class StepPlan:
    """One step: closed loop at ``concurrency`` or open loop at ``rate`` requests/s."""

    mode: str  # "closed" or "open"
    level: float
    duration_s: float
    warmup_s: float
    max_requests: int = 0  # stop after this many measured requests (0: by duration)
    timeout_s: float = 30.0
    seed: int = 0
    max_inflight: int = 4096


async def run_step(
    plan: StepPlan,
    targets: Sequence[Target],
    payloads: Sequence[Payload],
    headers: dict[str, str],
    *,
    on_record: Callable[[Record], None] | None = None,
    start_at: float | None = None,
) -> list[Record]:
    """Run one step; returns the measured records (warm-up excluded). Targets rotate per request."""
    raws = [[encode_request(t, p.body, headers) for p in payloads] for t in targets]
    records: list[Record] = []
    loop_start = time.perf_counter() if start_at is None else start_at
    measure_from = loop_start + plan.warmup_s
    stop_at = measure_from + plan.duration_s
    while time.perf_counter() < loop_start:
        await asyncio.sleep(loop_start - time.perf_counter())  # a start time shared by processes

    def keep(intended: float, rec: Record) -> None:
        if intended >= measure_from and (plan.max_requests == 0 or len(records) < plan.max_requests):
            records.append(rec)
            if on_record is not None:
                on_record(rec)

    def done() -> bool:
        return time.perf_counter() >= stop_at or (plan.max_requests > 0 and len(records) >= plan.max_requests)

    step = _Step(plan, targets, payloads, raws, keep, done, measure_from)
    if plan.mode == "closed":
        await _closed(step)
    else:
        await _open(step, loop_start=loop_start, stop_at=stop_at)
    return records


Keep = Callable[[float, Record], None]


async def _exchange(
    conn: Connection, raw: bytes, *, timeout_s: float, payload: Payload, intended: float, t0: float
) -> Record:
    """Send one request on ``conn`` and record it; latency runs from ``intended``."""
    sent = time.perf_counter()
    status, error, headers = await _send(conn, raw, timeout_s)
    return _record(
        intended=intended - t0,
        sent=sent - t0,
        done=time.perf_counter() - t0,
        status=status,
        error=error,
        headers=headers,
        payload=payload,
        target=conn.target,
    )


@dataclass(frozen=True)
class _Step:
    """What both loops share: the plan, targets, payloads (pre-encoded per target) and sinks."""

    plan: StepPlan
    targets: Sequence[Target]
    payloads: Sequence[Payload]
    raws: list[list[bytes]]
    keep: Keep
    done: Callable[[], bool]
    t0: float  # the measured window's start: record times are relative to it

    def pick(self, n: int) -> tuple[int, int]:
        """Request n's target (round robin) and payload (cycling), as indices."""
        return n % len(self.targets), (n // len(self.targets)) % len(self.payloads)

    async def exchange(self, conn: Connection, n: int, intended: float) -> None:
        """Send request n on ``conn`` (its target), record it from ``intended``, keep it."""
        t_i, p_i = self.pick(n)
        record = await _exchange(
            conn,
            self.raws[t_i][p_i],
            timeout_s=self.plan.timeout_s,
            payload=self.payloads[p_i],
            intended=intended,
            t0=self.t0,
        )
        self.keep(intended, record)


async def _closed(step: _Step) -> None:
    concurrency = int(step.plan.level)

    async def worker(index: int) -> None:
        conn = Connection(step.targets[index % len(step.targets)])
        n = index
        try:
            while not step.done():
                target = step.targets[step.pick(n)[0]]
                if target != conn.target:
                    conn.close()
                    conn = Connection(target)
                await step.exchange(conn, n, time.perf_counter())
                n += concurrency
        finally:
            conn.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


async def _open(step: _Step, *, loop_start: float, stop_at: float) -> None:
    plan = step.plan
    idle: dict[int, list[Connection]] = {i: [] for i in range(len(step.targets))}
    inflight: set[asyncio.Task[None]] = set()

    async def one(n: int, intended: float) -> None:
        t_i = step.pick(n)[0]
        pool = idle[t_i]
        conn = pool.pop() if pool else Connection(step.targets[t_i])
        await step.exchange(conn, n, intended)
        if conn.writer is not None:
            pool.append(conn)

    for n, offset in enumerate(poisson_arrivals(plan.level, plan.seed)):
        intended = loop_start + offset
        if intended >= stop_at or step.done():
            break
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(inflight) >= plan.max_inflight:
            payload = step.payloads[step.pick(n)[1]]
            rec = Record(
                intended - step.t0,
                intended - step.t0,
                0.0,
                0,
                "client_overload",
                "",
                float("nan"),
                float("nan"),
                0,
                payload.tokens,
                payload.items,
                "",
            )
            step.keep(intended, rec)
        else:
            task = asyncio.create_task(one(n, intended))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
    if inflight:
        await asyncio.gather(*inflight)
    for pool in idle.values():
        for conn in pool:
            conn.close()


def poisson_arrivals(rate: float, seed: int) -> Iterator[float]:
    """Arrival offsets (seconds from 0) of a Poisson process: exponential gaps of mean 1/rate."""
    rng = random.Random(seed)  # noqa: S311 - a load schedule, not a secret
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


def poisson_schedule(rate: float, duration_s: float, seed: int) -> list[float]:
    """The intended start times an open-loop step at ``rate`` uses within ``duration_s``."""
    return list(itertools.takewhile(lambda t: t < duration_s, poisson_arrivals(rate, seed)))
