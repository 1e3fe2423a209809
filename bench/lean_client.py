"""A lean closed-loop HTTP/1.1 load client for benchmarks on a 2-core machine.

Pre-encoded requests over keep-alive connections with asyncio streams: a few tens of
microseconds of client CPU per request, so the client takes little from the server it measures.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def throughput(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    def percentile(self, q: float) -> float:
        data = sorted(self.latencies_s)
        if not data:
            return float("nan")
        index = min(len(data) - 1, max(0, round(q / 100 * len(data) + 0.5) - 1))
        return data[index]


def build_request(port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers


async def closed_loop(
    port: int, requests: list[bytes], concurrency: int, duration_s: float, warmup_s: float
) -> LoadResult:
    """``concurrency`` connections each send requests back to back; the warm-up is not counted."""
    result = LoadResult()
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def worker(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = index
        try:
            while True:
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                writer.write(requests[n % len(requests)])
                n += concurrency
                status, headers = await _read_response(reader)
                done = time.perf_counter()
                if sent >= measure_from and done <= stop_at:
                    result.statuses[status] = result.statuses.get(status, 0) + 1
                    if status == 200:
                        result.latencies_s.append(done - sent)
                        result.batch_sizes.append(int(headers.get("x-batch-size", "0")))
                if headers.get("connection") == "close":
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    result.elapsed_s = duration_s
    return result


def run_closed_loop(
    port: int, requests: list[bytes], concurrency: int, duration_s: float, warmup_s: float
) -> LoadResult:
    return asyncio.run(closed_loop(port, requests, concurrency, duration_s, warmup_s))
