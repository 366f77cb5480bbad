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
