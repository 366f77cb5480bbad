"""The router's Prometheus metrics (``fairbatch_router:`` series): counters and histograms
of what it did, and gauges of each backend as it sees it now."""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fairbatch.cluster.router_workers import MULTIPROC_ENV
from fairbatch.routing import PrefixRouter

if TYPE_CHECKING:
    from fairbatch.cluster.router.state import RouterState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RouterMetrics:
    def __init__(self, state: "RouterState", prefix: str = "fairbatch_router") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        p = prefix + ":"
        r = self.registry
        self.prefix = prefix
        self.requests = Counter(p + "requests", "Requests answered, by the backend that answered (or none) and "
                                "HTTP status.", ["backend", "status"], registry=r)
        self.retries = Counter(p + "retries", "Requests moved off a backend before they started, by cause.",
                               ["backend", "reason"], registry=r)
        self.midstream_failures = Counter(p + "midstream_failures", "Streams cut after they had started (the "
                                          "client got an error event).", ["backend"], registry=r)
        self.poll_failures = Counter(p + "poll_failures", "Failed load polls.", ["backend"], registry=r)
        self.marked_unhealthy = Counter(p + "backend_marked_unhealthy", "Times a backend was marked unhealthy.",
                                        ["backend"], registry=r)
        self.routing_seconds = Histogram(p + "routing_decision_seconds", "Time to choose a backend.",
                                         buckets=(1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2), registry=r)
        self.first_output_seconds = Histogram(
            p + "time_to_first_output_seconds", "From the request's arrival to its first output forwarded "
            "(streaming) or its whole answer (non-streaming), retries included.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0), registry=r)
        self._backends = BackendCollector(state, p)
        self.registry.register(self._backends)

    def render(self) -> bytes:
        if os.environ.get(MULTIPROC_ENV):
            # several router workers (router_workers.py): counters and histograms summed
            # over all of them from their shared files, the backend gauges from this one
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(self._backends)
            return generate_latest(registry)
        return generate_latest(self.registry)


class BackendCollector(Collector):
    def __init__(self, state: "RouterState", p: str) -> None:
        self.state = state
        self.p = p

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        p = self.p
        now = time.time()
        fams = {
            "healthy": GaugeMetricFamily(p + "backend_healthy", "1 if the backend gets requests.", labels=["backend"]),
            "inflight": GaugeMetricFamily(p + "backend_inflight", "Requests open on the backend through this router.",
                                          labels=["backend"]),
            "sent": GaugeMetricFamily(p + "backend_sent_since_poll", "Requests sent after the load the router "
                                      "holds was measured.", labels=["backend"]),
            "age": GaugeMetricFamily(p + "backend_load_age_seconds", "Age of the load the router holds.",
                                     labels=["backend"]),
            "budget": GaugeMetricFamily(p + "backend_admission_budget_tokens", "Backend's admission budget at "
                                        "its last poll.", labels=["backend"]),
            "requests": GaugeMetricFamily(p + "backend_num_requests", "Running + waiting at the last poll.",
                                          labels=["backend"]),
        }
        router = self.state.router
        sizes = router.index_sizes() if isinstance(router, PrefixRouter) else None
        if sizes is not None:   # the prefix router: its estimate of what each backend caches
            fams["index"] = GaugeMetricFamily(p + "backend_prefix_index_blocks", "Prompt blocks the prefix router "
                                              "believes the backend holds (its index of what it sent there).",
                                              labels=["backend"])
            hit = GaugeMetricFamily(p + "prefix_estimated_hit_ratio", "Of the prompt tokens routed (this worker), "
                                    "the fraction the chosen backend's index held.")
            hit.add_metric([], router.hits_tokens / router.prompt_tokens if router.prompt_tokens else 0.0)
            fams["hit"] = hit
        for b in self.state.backends:
            if sizes is not None:
                fams["index"].add_metric([b.url], sizes[b.index] if b.index < len(sizes) else 0)
            fams["healthy"].add_metric([b.url], 1.0 if b.healthy else 0.0)
            fams["inflight"].add_metric([b.url], b.inflight)
            if router.count_sent and b.index < len(router.sent_reqs):
                fams["sent"].add_metric([b.url], router.sent_reqs[b.index])
            if b.load is not None:
                fams["age"].add_metric([b.url], now - b.load_wall)
                if math.isfinite(b.load.admission_budget):
                    fams["budget"].add_metric([b.url], b.load.admission_budget)
                fams["requests"].add_metric([b.url], b.load.num_requests)
        yield from fams.values()
