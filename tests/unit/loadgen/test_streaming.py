"""The streaming client against a scripted server-sent-events server: what each request's record
says about content, timing, tokens and failures; the generative figures, percentiles, goodput,
knee and decision; the engines' histograms read as Prometheus would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from pathlib import Path

import httpx
import pytest

from neuronserve.loadgen.engine_metrics import quantile, scrape, summary
from neuronserve.loadgen.genload import Prompt, StreamPlan, run_stream_step
from neuronserve.loadgen.genstats import GenBudgets, GenStep, Slo, decide, knee, linear_percentile, summarize
from neuronserve.loadgen.sse import Api, SSEParser, StreamRecord, request_body, stream_request

# A step of the script: bytes to send, or a pause in seconds, or "close" (cut the connection).
Step = bytes | float | str


def chat(content: str | None, *, role: bool = False, finish: str | None = None) -> bytes:
    delta: dict[str, str] = {"role": "assistant"} if role else {}
    if content is not None:
        delta["content"] = content
    event = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def usage(completion: int, prompt: int = 7) -> bytes:
    event = {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


async def _serve(script: list[Step], head: bytes = SSE_HEAD) -> tuple[asyncio.AbstractServer, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            headers = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in headers.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            writer.write(head)
            for step in script:
                if isinstance(step, float):
                    await writer.drain()
                    await asyncio.sleep(step)
                elif step == "close":
                    writer.transport.abort()
                    return
                else:
                    assert isinstance(step, bytes)
                    writer.write(step)
            await writer.drain()
        finally:  # also when the client gave up first and the loop cancels this
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def run(
    script: list[Step], *, timeout_s: float = 5.0, head: bytes = SSE_HEAD, api: Api = "openai-chat"
) -> StreamRecord:
    async def main() -> StreamRecord:
        server, url = await _serve(script, head)
        try:
            async with httpx.AsyncClient() as client:
                record = StreamRecord(index=0, intended_s=0.0, sent_s=0.0)
                body = request_body(api, "m", "hello", 8, ignore_eos=False)
                path = "/v1/chat/completions" if api == "openai-chat" else "/v1/completions"
                return await stream_request(
                    client,
                    url + path,
                    body,
                    {},
                    api=api,
                    record=record,
                    timeout_s=timeout_s,
                )
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


def test_the_first_content_chunk_starts_the_answer_and_usage_counts_its_tokens() -> None:
    # vLLM's chat stream opens with a chunk that only names the role: no content, not the first token
    record = run(
        [
            chat(None, role=True),
            0.15,
            chat("Hel"),
            0.05,
            chat("lo, wor"),
            0.05,
            chat("ld", finish="stop"),
            usage(5),
            DONE,
        ]
    )
    assert record.ok, record.detail
    assert record.ttft_s >= 0.15  # from the first chunk that carried content
    assert len(record.itl_s) == 2 and all(gap >= 0.04 for gap in record.itl_s)  # one gap per content chunk
    assert (record.output_tokens, record.tokens_from, record.prompt_tokens) == (5, "usage", 7)
    assert record.text == "Hello, world" and record.finish_reason == "stop" and record.chunks == 3
    # TPOT spreads the time after the first token over every token after it (chunks carry several)
    assert record.tpot_s == pytest.approx((record.e2el_s - record.ttft_s) / 4)


def test_an_empty_content_chunk_is_not_the_first_token_and_completions_read_text() -> None:
    record = run([chat(""), 0.1, chat("a"), chat("b"), usage(2), DONE])
    assert record.ok and record.ttft_s >= 0.1
    completion = {"choices": [{"index": 0, "text": "abc", "finish_reason": None}]}
    record = run([b"data: " + json.dumps(completion).encode() + b"\n\n", DONE], api="openai-completions")
    assert record.ok and record.text == "abc" and record.tokens_from == ""  # no usage: counted later


@pytest.mark.parametrize(
    ("script", "error"),
    [
        ([chat("a"), b'data: {"error": {"message": "engine died", "code": 500}}\n\n', DONE], "stream_error"),
        ([chat("a"), chat("b"), "close"], "truncated"),  # a copy killed mid-answer
        ([chat("a"), chat("b")], "truncated"),  # the stream ended without [DONE]
        ([b"data: {not json\n\n", DONE], "bad_chunk"),
        ([chat(None, role=True), usage(0), DONE], "no_content"),
    ],
    ids=["error-event", "connection-cut", "no-done", "bad-json", "no-content"],
)
def test_a_failed_stream_is_classified_and_never_a_success(script: list[Step], error: str) -> None:
    record = run(script)
    assert record.error == error and not record.ok, (record.error, record.detail)
    if error == "stream_error":
        assert "engine died" in record.detail


def test_a_client_timeout_and_an_http_error_are_failures_with_their_reason() -> None:
    slow = run([chat("a"), 2.0, chat("b"), DONE], timeout_s=0.5)
    assert slow.error == "timeout" and "0.5 s" in slow.detail and not math.isnan(slow.ttft_s)
    body = b'{"error": {"message": "too many requests", "type": "overload"}}'
    head = (
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % len(body)
    )
    refused = run([body], head=head)
    assert (refused.error, refused.status, refused.detail) == ("http_429", 429, "too many requests")


def test_the_sse_parser_joins_events_split_anywhere_and_skips_comments() -> None:
    stream = b": ping\n\ndata: one\r\n\r\ndata: two\ndata: lines\n\nevent: x\ndata: [DONE]\n\n"
    parser = SSEParser()
    got = [data for i in range(len(stream)) for data in parser.feed(stream[i : i + 1])]
    assert got == ["one", "two\nlines", "[DONE]"]
    tail = SSEParser()
    assert list(tail.feed(b"data: cut")) == [] and list(tail.close()) == ["cut"]


def test_a_closed_loop_step_keeps_its_concurrency_and_records_every_request() -> None:
    async def main() -> tuple[list[StreamRecord], float, int]:
        open_now = peak = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal open_now, peak
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            open_now += 1
            peak = max(peak, open_now)
            writer.write(SSE_HEAD + chat("x"))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(chat("y") + usage(2) + DONE)
            open_now -= 1
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        plan = StreamPlan("openai-chat", "m", "closed", 3, 10, 5.0, ignore_eos=False, seed=0)
        records, duration = await run_stream_step(plan, url, [Prompt("p", 1, 2)], {})
        server.close()
        await server.wait_closed()
        return records, duration, peak

    records, duration, peak = asyncio.run(main())
    assert len(records) == 10 and all(r.ok for r in records) and peak == 3
    assert [r.index for r in records] == list(range(10))
    assert duration >= 4 * 0.05  # ceil(10 / 3) rounds of 50 ms


def _record(ttft: float, e2el: float, tokens: int, error: str = "") -> StreamRecord:
    r = StreamRecord(index=0, intended_s=0.0, sent_s=0.0, status=200, error=error, ttft_s=ttft, e2el_s=e2el)
    r.output_tokens, r.tokens_from, r.prompt_tokens = tokens, "usage", 10
    r.itl_s = [(e2el - ttft) / max(1, tokens - 1)] * max(0, tokens - 1)
    return r


def test_step_figures_follow_their_definitions() -> None:
    records = [
        _record(0.1, 1.1, 11),
        _record(0.3, 2.3, 21),
        _record(0.2, 0.2, 1),
        _record(math.nan, math.nan, 0, "timeout"),
    ]
    step = summarize(
        records,
        mode="closed",
        level=2,
        duration_s=4.0,
        slo=Slo(ttft_ms=250, tpot_ms=150),
        dollars_per_hour=3.6,
    )
    assert (step.completed, step.errors, step.error_rate) == (3, {"timeout": 1}, 0.25)
    assert step.output_tokens == 33 and step.output_tokens_per_s == pytest.approx(33 / 4)
    assert step.request_throughput == pytest.approx(0.75) and step.transactions_per_minute == pytest.approx(
        45
    )
    assert step.tpot_ms["p50"] == pytest.approx(
        100.0
    )  # (1.1 - 0.1) / 10 and (2.3 - 0.3) / 20; none for 1 token
    assert step.ttft_ms["p50"] == pytest.approx(200.0) and step.ttft_ms["max"] == pytest.approx(300.0)
    assert step.goodput_per_s == pytest.approx(2 / 4)  # TTFT 300 ms misses 250; the timeout meets nothing
    assert step.cost_per_million_output_tokens == pytest.approx(1e6 / (33 / 4) / 3600 * 3.6)
    assert step.cost_per_10k_transactions == pytest.approx(1e4 / 0.75 / 3600 * 3.6)


def test_percentiles_interpolate_as_the_other_clients_do() -> None:
    assert linear_percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5  # an even count's median: the middle two
    assert linear_percentile([float(v) for v in range(1, 101)], 99) == pytest.approx(99.01)
    assert math.isnan(linear_percentile([], 50))


def test_the_decision_is_the_most_tokens_inside_the_budgets_and_the_knee_where_tpot_crosses_its_budget() -> (
    None
):
    def step(level: int, tpot: float, tokens: float, ttft: float = 100.0) -> GenStep:
        s = summarize([_record(ttft / 1000, ttft / 1000 + tpot / 1000 * 9, 10)], mode="closed", level=level,
                      duration_s=10 / tokens, slo=Slo(), dollars_per_hour=None)  # fmt: skip
        return s

    steps = [step(1, 40, 20), step(2, 60, 35), step(4, 90, 50), step(8, 140, 55, ttft=900)]
    assert knee(steps, 100.0) == 2  # the last step whose median TPOT stays within 100 ms
    verdict = decide(steps, GenBudgets(ttft_p95_ms=500, tpot_p95_ms=100, error_rate=0.01), by_goodput=False)
    assert verdict["best"] == 2 and "50.0 output tokens/s" in verdict["verdict"]
    none = decide(steps, GenBudgets(ttft_p95_ms=50, tpot_p95_ms=0, error_rate=0.01), by_goodput=False)
    assert none["best"] is None and "p95 TTFT 100 ms > 50 ms" in none["reasons"]["closed 1"][0]


HISTOGRAM = """# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{le="0.1",model_name="m"}} {a}
vllm:time_to_first_token_seconds_bucket{{le="0.2",model_name="m"}} {b}
vllm:time_to_first_token_seconds_bucket{{le="+Inf",model_name="m"}} {c}
vllm:time_to_first_token_seconds_count{{model_name="m"}} {c}
vllm:time_to_first_token_seconds_sum{{model_name="m"}} 1.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{{model_name="m"}} {tokens}
"""


def test_the_engines_counters_and_histograms_are_read_as_deltas_over_copies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert quantile({0.1: 5.0, 0.2: 10.0, math.inf: 10.0}, 0.5) == pytest.approx(0.1)
    assert quantile({0.1: 0.0, 0.2: 10.0, math.inf: 10.0}, 0.5) == pytest.approx(0.15)
    served = {
        "/a": HISTOGRAM.format(a=1, b=2, c=2, tokens=100),
        "/b": HISTOGRAM.format(a=0, b=0, c=0, tokens=50),
    }
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=served[request.url.path]))
    monkeypatch.setattr(httpx, "get", lambda url, **_kw: httpx.Client(transport=transport).get(url))
    before = scrape(["http://x/a", "http://x/b"])
    served.update(
        {"/a": HISTOGRAM.format(a=3, b=6, c=6, tokens=160), "/b": HISTOGRAM.format(a=2, b=4, c=4, tokens=90)}
    )
    delta = summary(scrape(["http://x/a", "http://x/b"]).minus(before))
    assert delta["generation_tokens"] == 100 and delta["copies"] == 2
    # 8 new requests: 4 under 100 ms, 4 more under 200 ms: the median is the first bucket's edge
    assert delta["ttft_ms"]["p50"] == pytest.approx(100.0)  # type: ignore[index]


def test_what_a_failure_records_never_holds_the_prompt_or_the_answer() -> None:
    secret = "the-prompt-or-answer-text"
    bad = run([b"data: " + secret.encode() + b"\n\n", DONE])
    assert bad.error == "bad_chunk" and secret not in bad.detail
    body = json.dumps(
        {"detail": [{"loc": ["body", "messages"], "msg": "too long", "input": secret}]}
    ).encode()
    head = b"HTTP/1.1 422 Unprocessable\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    refused = run([body], head=head % len(body))
    assert refused.error == "http_422" and refused.detail == "body.messages: too long"
    aborted = run([chat("a"), chat(None, finish="abort"), DONE])
    assert aborted.error == "aborted" and not aborted.ok


def test_a_steps_duration_runs_to_its_last_request_whatever_ended_it() -> None:
    """One answer at once, one that times out later: the step lasts until the timeout, not the answer."""

    async def main() -> tuple[list[StreamRecord], float]:
        calls = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal calls
            calls += 1
            mine = calls
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(x.split(b":")[1])
                    for x in head.split(b"\r\n")
                    if x.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                if mine == 2:
                    with contextlib.suppress(asyncio.CancelledError):  # cancelled when the test's loop ends
                        await asyncio.sleep(5)  # never answers in time
                    return
                writer.write(SSE_HEAD + chat("x") + usage(1) + DONE)
                await writer.drain()
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        plan = StreamPlan("openai-chat", "m", "closed", 2, 2, 0.6, ignore_eos=False, seed=0)
        records, duration = await run_stream_step(plan, url, [Prompt("p", 1, 1)], {})
        server.close()
        await server.wait_closed()
        return records, duration

    records, duration = asyncio.run(main())
    assert sorted(r.error for r in records) == ["", "timeout"]
    assert duration >= 0.6  # the timed-out request's time counts


def test_no_knee_when_every_step_is_over_the_per_token_budget() -> None:
    steps = [
        summarize(
            [_record(0.1, 0.1 + tpot * 9, 10)],
            mode="closed",
            level=level,
            duration_s=1.0,
            slo=Slo(),
            dollars_per_hour=None,
        )
        for level, tpot in ((1, 0.15), (2, 0.2), (4, 0.3))
    ]
    assert knee(steps, 100.0) is None


def test_every_generative_option_reaches_its_setting(tmp_path: Path) -> None:
    from neuronserve.loadgen.cli import _settings
    from neuronserve.loadgen.options import build_parser

    (tmp_path / "c.properties").write_text("")
    args = build_parser().parse_args(
        ["--config", str(tmp_path / "c.properties"), "--api", "openai-completions", "--input-len", "7",
         "--output-len", "9", "--num-prompts", "3", "--seed", "5", "--ignore-eos", "--tokenizer", "t.json",
         "--ttft-budget", "800", "--tpot-budget", "50", "--goodput", "ttft:1", "--engine-metrics", "http://x/m",
         "--extra-body", "{}"]
    )  # fmt: skip
    b = _settings(args).bench
    assert (b.api, b.input_len, b.output_len, b.num_prompts, b.seed, b.ignore_eos) == (
        "openai-completions", 7, 9, 3, 5, True,
    )  # fmt: skip
    assert (b.tokenizer, b.ttft_budget_ms, b.tpot_budget_ms, b.goodput, b.engine_metrics, b.extra_body) == (
        "t.json", 800.0, 50.0, "ttft:1", "http://x/m", "{}",
    )  # fmt: skip
