"""Routing policies: which instance gets a new request.

A layer of its own between the scheduler (whose ``Load`` the policies read) and the two
hosts that route: the cluster simulator (``fairbatch.sim``) and the HTTP router
(``fairbatch.cluster``). It imports nothing of either.

- ``base.py``: ``Router``, the interface and the sent-since-poll accounting;
- ``policies.py``: round robin, least requests, Llumnix, admission budget;
- ``prefix.py``: prefix affinity balanced against load (an index of what went where);
- ``registry.py``: routers by name and spec (``make_router``).
"""

from fairbatch.routing.base import Router
from fairbatch.routing.policies import AdmissionRouter, LeastRequestsRouter, LlumnixRouter, RoundRobinRouter
from fairbatch.routing.prefix import PrefixIndex, PrefixRouter
from fairbatch.routing.registry import make_router, parse_router_spec, router_names

__all__ = ["AdmissionRouter", "LeastRequestsRouter", "LlumnixRouter", "PrefixIndex", "PrefixRouter",
           "RoundRobinRouter", "Router",
           "make_router", "parse_router_spec", "router_names"]
