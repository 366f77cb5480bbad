"""The simulator's results on the bundled traces, pinned: a refactor of the scheduler core
or the simulator must leave them bit-for-bit unchanged (issue: "behaviour unchanged").

The first 1,500 requests of each bundled trace, every policy, the default late handling,
at a load past the baselines' capacity (so preemption, relegation and the set-aside all
run). A deliberate change of behaviour regenerates the file and says why in its commit:

    python tests/test_sim_golden.py --update
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fairbatch.sim.experiment import Scenario, prepare, run_policy

GOLDEN = Path(__file__).parent / "data" / "sim_golden.json"
CASES = {"azure-conv": 4.5, "azure-code": 1.5}      # rate scale per trace
POLICIES = ("vllm", "vllm-priority", "sarathi:chunk_size=1024", "qoserve", "fairbatching", "prefill-first")
KEYS = ("completed", "slo_attainment", "ttft_attainment", "tpot_attainment", "median_ttft_ms", "p99_ttft_ms",
        "p99_tpot_ms", "mean_e2el_ms", "relegated", "rejected", "num_preemptions")


def results(cases: dict[str, float] = CASES, keys: tuple[str, ...] = KEYS) -> dict[str, dict[str, float]]:
    out = {}
    for trace, scale in cases.items():
        prep = prepare(Scenario(trace=trace, num_requests=1500))
        for policy in POLICIES:
            s = run_policy(prep, policy, scale).summary
            out[f"{trace} {policy}"] = {k: s[k] for k in keys}
    return out


def check_golden(golden_file: Path, got: dict[str, dict[str, float]], script: str) -> None:
    if not golden_file.exists():
        pytest.fail(f"{golden_file} missing: python tests/{script} --update")
    # to 1e-9: a refactor changes nothing, while a numpy release may round a percentile's
    # last bit differently
    golden = json.loads(golden_file.read_text())
    assert got.keys() == golden.keys()
    for case, values in golden.items():
        assert got[case] == pytest.approx(values, rel=1e-9), case


def update_golden(golden_file: Path, got: dict[str, dict[str, float]]) -> None:
    golden_file.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    print(f"wrote {golden_file}")


def test_simulated_results_unchanged() -> None:
    check_golden(GOLDEN, results(), "test_sim_golden.py")


if __name__ == "__main__":
    if "--update" in sys.argv:
        update_golden(GOLDEN, results())
