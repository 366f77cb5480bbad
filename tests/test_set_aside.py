"""Moore-Hodgson set-aside (scheduler/set_aside.py): most prompts on time, the rest after."""

from __future__ import annotations

from itertools import permutations

from fairbatch.request import SLO, Request
from fairbatch.scheduler.set_aside import moore_hodgson


def prompt(name: str, tokens: int, deadline: float) -> Request:
    return Request(name, 0.0, tokens, 1, SLO(ttft=deadline, tpot=1.0))


def on_time(order: list[Request], rate: float) -> int:
    t, n = 0.0, 0
    for r in order:
        t += r.prompt_len / rate
        n += t <= r.deadline
    return n


def test_sets_aside_the_long_prompt_that_would_make_two_late() -> None:
    # at 1,000 tokens/s, in deadline order: the 1,500-token prompt makes the two after it late
    long, a, b = prompt("long", 1500, 1.55), prompt("a", 200, 1.6), prompt("b", 200, 1.7)
    order = moore_hodgson([long, a, b], 0.0, 0.0, 1000.0, key=lambda r: r.deadline)
    assert order == [a, b, long]
    assert on_time(order, 1000.0) == 2 > on_time([long, a, b], 1000.0)


def test_is_optimal_for_the_count_on_small_cases() -> None:
    reqs = [prompt(f"r{i}", n, d) for i, (n, d) in enumerate([(300, 0.5), (500, 0.9), (200, 1.0),
                                                             (400, 1.2), (100, 1.3)])]
    best = max(on_time(list(p), 1000.0) for p in permutations(reqs))
    order = moore_hodgson(sorted(reqs, key=lambda r: r.deadline), 0.0, 0.0, 1000.0, key=lambda r: r.deadline)
    assert on_time(order, 1000.0) == best


def test_work_ahead_counts_and_nothing_is_dropped() -> None:
    a, b = prompt("a", 100, 0.5), prompt("b", 100, 0.6)
    assert moore_hodgson([a, b], 0.0, 0.0, 1000.0, key=lambda r: r.deadline) == [a, b]
    # 0.45 s of work already ahead: a would end at 0.55, past its 0.5; it is set aside
    # (after b, not dropped) and b, ending at 0.55, makes its 0.6
    assert moore_hodgson([a, b], 0.0, 0.45, 1000.0, key=lambda r: r.deadline) == [b, a]
