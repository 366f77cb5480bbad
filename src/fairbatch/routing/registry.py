"""Routers by name: ``make_router("least_requests:count_sent=false")``."""

from __future__ import annotations

from typing import Any

from fairbatch.routing.base import Router
from fairbatch.routing.policies import AdmissionRouter, LeastRequestsRouter, LlumnixRouter, RoundRobinRouter
from fairbatch.routing.prefix import PrefixRouter

_ROUTERS: dict[str, type[Router]] = {
    cls.name: cls for cls in (RoundRobinRouter, LeastRequestsRouter, LlumnixRouter, AdmissionRouter, PrefixRouter)
}
# options of one router only: name -> (type, lowest value)
_OWN_OPTIONS: dict[str, dict[str, tuple[type, float]]] = {
    "prefix": {"index_blocks": (int, 0), "balance_abs": (float, 0), "balance_rel": (float, 1)},
}
_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def router_names() -> list[str]:
    return list(_ROUTERS)


def parse_router_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:KEY=VALUE,...]`` -> (name, options); options: ``count_sent`` (bool),
    ``block_size`` (int), and ``prefix``'s ``index_blocks`` (int), ``balance_abs``,
    ``balance_rel`` (numbers). E.g. ``least_requests:count_sent=false``."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip().replace("-", "_")
    if name not in _ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(_ROUTERS)}")
    opts: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        value = value.strip().lower()
        if not sep:
            raise ValueError(f"bad router option {item!r} in {spec!r}: expected KEY=VALUE")
        if key == "count_sent":
            if value not in _BOOL:
                raise ValueError(f"bad router option {item!r}: count_sent is true or false")
            opts[key] = _BOOL[value]
        elif key == "block_size":
            try:
                opts[key] = int(value)
            except ValueError:
                raise ValueError(f"bad router option {item!r}: block_size is an integer") from None
            if opts[key] < 1:
                raise ValueError(f"bad router option {item!r}: block_size must be >= 1")
        elif key in _OWN_OPTIONS.get(name, {}):
            kind, low = _OWN_OPTIONS[name][key]
            try:
                opts[key] = kind(value)
            except ValueError:
                raise ValueError(f"bad router option {item!r}: {key} is {'an integer' if kind is int else 'a number'}"
                                 ) from None
            if not opts[key] >= low:
                raise ValueError(f"bad router option {item!r}: {key} must be >= {low:g}")
        else:
            known = ", ".join(["count_sent", "block_size", *_OWN_OPTIONS.get(name, {})])
            raise ValueError(f"unknown router option {key!r} in {spec!r} ({known})")
    return name, opts


def make_router(spec: str, **options: Any) -> Router:
    """A router from ``NAME[:KEY=VALUE,...]`` (see ``parse_router_spec``); keyword options
    override those in the spec."""
    name, opts = parse_router_spec(spec)
    opts.update(options)
    return _ROUTERS[name](**opts)
