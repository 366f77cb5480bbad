"""The simulator's results with prefix caching, pinned as test_sim_golden.py pins those
without: the first 1,500 requests of the multi-turn trace (shared prefixes named per
512-token block), every policy, past the baselines' capacity so that prefixes are taken,
given back, evicted and preempted. A deliberate change regenerates the file and says why
in its commit:

    python tests/test_prefix_cache_golden.py --update
"""

from __future__ import annotations

import sys
from pathlib import Path

from test_sim_golden import KEYS, check_golden, results, update_golden

GOLDEN = Path(__file__).parent / "data" / "prefix_cache_golden.json"
CASES = {"multi-turn": 25.0}      # rate scale: far past capacity, up to 430 preemptions
CACHE_KEYS = (*KEYS, "prefix_cache_hit_rate")


def test_simulated_results_with_prefix_caching_unchanged() -> None:
    check_golden(GOLDEN, results(CASES, CACHE_KEYS), "test_prefix_cache_golden.py")


if __name__ == "__main__":
    if "--update" in sys.argv:
        update_golden(GOLDEN, results(CASES, CACHE_KEYS))
