"""The served-delay benchmark's readings: the front end's first-token delivery histogram
on /metrics, and the quantile the benchmark reads from its buckets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from fairbatch.bench.prometheus_text import samples  # noqa: E402
from fairbatch.server import ServerThread, build_app, load_served_model  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "micro" / "served_delay.py"


def load_script():
    spec = importlib.util.spec_from_file_location("served_delay", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quantile_interpolates_inside_buckets():
    q = load_script().quantile_ms
    name = "first_token_delivery_seconds"
    delta = {f"{name}_bucket:0.001": 0.0, f"{name}_bucket:0.01": 50.0, f"{name}_bucket:0.1": 100.0,
             f"{name}_bucket:inf": 100.0}
    assert q(delta, name, 0.5) == pytest.approx(10.0)
    assert q(delta, name, 0.25) == pytest.approx(5.5)
    assert q(delta, name, 0.75) == pytest.approx(55.0)
    assert q({}, name, 0.5) is None


def test_every_streamed_first_token_is_counted_in_the_delivery_histogram():
    model = load_served_model("llama-3-8b", load_format="simulated", num_kv_blocks=256, ttft_slo=2.0, tpot_slo=0.5)
    with ServerThread(build_app(model)) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        for _ in range(3):
            with http.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True}) as r:
                assert r.status_code == 200
                r.read()
        page = {x.name: x.value for x in samples(http.get("/metrics").text) if not x.labels.get("le")}
    assert page["fairbatch:first_token_delivery_seconds_count"] == 3
    assert page["fairbatch:first_token_delivery_seconds_sum"] >= 0


def test_chunk_events_match_encode_event_byte_for_byte():
    from fairbatch.server.sse_stream import ChunkEvents
    from fairbatch.wire.sse import encode_event

    choice = {"index": 1, "text": 'a"\\\u2028\n\u00e9', "logprobs": None, "finish_reason": None}
    for base in ({"id": "x", "object": "text_completion", "created": 1, "model": "m\u2028"}, {}):
        events = ChunkEvents(base)
        assert events.event(choice) == encode_event({**base, "choices": [choice]})
        assert events.event(choice, usage={"prompt_tokens": 2}) == encode_event(
            {**base, "choices": [choice], "usage": {"prompt_tokens": 2}})
        assert events.event(usage={"total_tokens": 3}) == encode_event({**base, "choices": [], "usage": {"total_tokens": 3}})


class _Backend:
    mirrors = False
    alive = True
    error = None

    def send(self, cmd) -> None:
        pass


class _Model:
    num_blocks = 1


def test_a_steps_first_tokens_reach_their_streams_before_later_tokens():
    from fairbatch.request import SLO, Request
    from fairbatch.server.async_engine import AsyncEngine
    from fairbatch.server.engine_messages import Delta, StepDeltas

    engine = AsyncEngine(_Model(), backend=_Backend())
    filled: list[str] = []
    for rid in ("a", "b", "c", "d"):
        group = engine.add([Request(rid, 0.0, 4, 8, SLO(1.0, 0.1))])
        group.queue.put_nowait = lambda item, rid=rid: filled.append(rid)
    engine._on_message(StepDeltas((("a", Delta([7], time=1.0, start=3)), ("b", Delta([7], time=1.0, start=0)),
                                   ("c", Delta([7], "length", time=1.0, start=5)),
                                   ("d", Delta([7], time=1.0, start=0)))))
    assert filled == ["b", "d", "a", "c"]


def test_later_tokens_wait_for_new_streams_first_writes():
    import asyncio

    from fairbatch.request import SLO, Request
    from fairbatch.server.async_engine import AsyncEngine
    from fairbatch.server.engine_messages import Delta, StepDeltas

    async def main():
        engine = AsyncEngine(_Model(), backend=_Backend())
        filled: list[str] = []
        groups = {}
        for rid in ("old1", "new1", "new2", "old2"):
            g = groups[rid] = engine.add([Request(rid, 0.0, 4, 8, SLO(1.0, 0.1))])
            g.streaming = rid.startswith("new")
            g.queue.put_nowait = lambda item, rid=rid: filled.append(rid)
        engine._on_message(StepDeltas((("old1", Delta([7], time=1.0, start=3)), ("new1", Delta([7], time=1.0)),
                                       ("new2", Delta([7], time=1.0)), ("old2", Delta([7], time=1.0, start=2)))))
        assert filled == ["new1", "new2"]
        groups["new1"].first_chunk_written(0)
        assert filled == ["new1", "new2"]
        groups["new2"].first_chunk_written(0)
        assert filled == ["new1", "new2", "old1", "old2"]
        # the next step's first tokens go ahead of tokens still held; a stream that never
        # writes holds the rest back only until the timer
        engine.add([Request("new3", 0.0, 4, 8, SLO(1.0, 0.1))]).streaming = True
        engine._on_message(StepDeltas((("new3", Delta([7], time=2.0)), ("old1", Delta([7], time=2.0, start=4)))))
        engine._on_message(StepDeltas((("new1", Delta([7], time=3.0, start=1)), ("new5", Delta([7], time=3.0)),
                                       ("old1", Delta([7], time=3.0, start=5)))))
        assert filled[-1] == "old2" and "old1" not in filled[4:]
        for _ in range(10_000):             # the timer's turn (a condition, not a duration)
            if len(filled) == 7:
                break
            await asyncio.sleep(0.001)
        assert filled[4:] == ["old1", "new1", "old1"]

    asyncio.run(main())
