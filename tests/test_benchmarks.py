"""benchmarks/: every path the docs, the code and the scripts name exists, every script is
listed in benchmarks/README.md, and serve_bench_device's capacity probes (metrics.capacity
started from the grid of fixed loads) pick the scales they always picked."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PATH_RE = re.compile(r"benchmarks/[\w/]+\.(?:py|sh)\b")


def _texts() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "pyproject.toml", *(ROOT / "docs").glob("*.md"), *BENCH.rglob("*"),
             *(ROOT / "src").rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "ci").glob("*"),
             *(ROOT / ".ci").glob("*")]
    return [f for f in files if f.is_file() and f.suffix in (".md", ".py", ".sh", ".toml", "")]


def test_named_benchmark_paths_exist() -> None:
    missing = {f"{f.relative_to(ROOT)}: {m}" for f in _texts() for m in PATH_RE.findall(f.read_text(errors="replace"))
               if not m.startswith("benchmarks/serve.py") and not (ROOT / m).is_file()}
    assert not missing, sorted(missing)


def test_every_script_listed_in_readme() -> None:
    readme = (BENCH / "README.md").read_text()
    scripts = [p for p in BENCH.rglob("*") if p.suffix in (".py", ".sh")]
    assert scripts and all(p.parent != BENCH for p in scripts), "scripts belong in a folder of benchmarks/"
    for p in scripts:
        assert f"## {p.parent.name}/" in readme and f"`{p.name}`" in readme, p


@pytest.fixture(scope="module")
def driver():
    spec = importlib.util.spec_from_file_location("serve_bench_device", BENCH / "gpu" / "serve_bench_device.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _search(driver, att, scales: list[float], probes: int, target: float = 0.9) -> list[float]:
    """The scales a served search runs, for an attainment curve ``att``."""
    done: dict[float, dict] = {}
    order: list[float] = []

    def run(scale: float) -> dict:
        order.append(scale)
        a = att(scale)
        done[scale] = {"att": a, "rate": 2 * scale, "result": {"slo_attainment": a, "request_rate": 2 * scale}}
        return done[scale]

    for s in scales:
        run(s)
    try:
        driver.probe_capacity(run, done, probes, target)
    except driver.OutOfBudget:
        pass
    return order


def test_serve_bench_cells_carry_settings_and_serve_flags(driver) -> None:
    assert driver.serve_args_of("qoserve") == ("qoserve", [])
    assert driver.serve_args_of("fairbatching:ttft_margin_quantile=0.9@--async-scheduling") == (
        "fairbatching", ["--set", "ttft_margin_quantile=0.9", "--async-scheduling"])
    assert driver.serve_args_of("sarathi@--prefill-attention,sdpa") == ("sarathi", ["--prefill-attention", "sdpa"])
    assert driver.file_label("fairbatching@--async-scheduling") == "fairbatching_--async-scheduling"


def test_served_fidelity_simulates_a_cells_policy_without_its_engine_flags() -> None:
    spec = importlib.util.spec_from_file_location("served_fidelity", BENCH / "gpu" / "served_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.variant_of("fairbatching:ttft_margin_quantile=0.9@--async-scheduling", []) == \
        "fairbatching:ttft_margin_quantile=0.9"
    assert mod.variant_of("qoserve@--async-scheduling", ["--set", "tpot_margin=0.1"]) == "qoserve:tpot_margin=0.1"


def test_serve_bench_probes(driver) -> None:
    def cap(c):
        return lambda s: 1.0 if s <= c else 0.5

    # bracketed by the grid: geometric bisection, rounded to 3 decimals, --probes runs
    assert _search(driver, cap(3.8), [3.4, 4.0], 3) == [3.4, 4.0, 3.688, 3.841, 3.764]
    # every run passed: steps of 25 % up, then bisection
    assert _search(driver, cap(4.3), [3.0], 3) == [3.0, 3.75, 4.688, 4.193]
    # every run missed: steps of 25 % down
    assert _search(driver, cap(2.0), [3.0], 2) == [3.0, 2.4, 1.92]
    # a failed bench run (no result) counts as a miss; no probes, no run
    assert _search(driver, cap(3.8), [3.4, 4.0], 0) == [3.4, 4.0]
    assert driver.bracket({3.0: {"att": 0.95}, 3.5: {"error": "bench exited 1"}, 4.0: {"att": 0.5}}, 0.9) == (3.0, 3.5)


def _fidelity_rows(capsys, *extra: str) -> dict[tuple[str, str], str]:
    """served_fidelity.py on the committed H100 runs: (policy, scale) -> simulated SLO attainment."""
    import sys

    spec = importlib.util.spec_from_file_location("served_fidelity", BENCH / "gpu" / "served_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    d = ROOT / "docs" / "results" / "fair_conv_h100_cut"
    argv = sys.argv
    sys.argv = ["served_fidelity.py", str(d / "b_summary.json"), "--num-blocks", "27850",
                "--profile", str(d / "b_profile_fairbatching.json"), "--set", "tpot_margin=0.1",
                "--set", "ttft_margin=0.1", "--served-offset", "measured", *extra]
    try:
        mod.main()
    finally:
        sys.argv = argv
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| policy ")]
    return {(r[1].strip(), r[2].strip()): r[5].split("/")[0].strip() for r in rows}


def test_served_fidelity_simulates_each_policy_on_its_own_refit_and_noisy_steps(capsys) -> None:
    """--policy-profile puts a policy's rows on its own server's refit (the others keep
    --profile); --step-noise averages --seeds runs of noisy steps."""
    d = ROOT / "docs" / "results" / "fair_conv_h100_cut"
    shared = _fidelity_rows(capsys)
    own = _fidelity_rows(capsys, "--policy-profile", f"qoserve={d / 'b_profile_qoserve.json'}")
    fb = "fairbatching:ttft_margin_quantile=0.9"
    assert set(shared) == set(own) == {("qoserve", "4"), (fb, "4")}
    assert own[(fb, "4")] == shared[(fb, "4")]
    assert own[("qoserve", "4")] != shared[("qoserve", "4")]
    noisy = _fidelity_rows(capsys, "--step-noise", "0.1", "--seeds", "2")
    assert noisy != shared
    assert all(0.0 <= float(v) <= 1.0 for v in noisy.values())


def test_step_kernels_groups_gpu_kernels_by_kind() -> None:
    """The kernel breakdown of issue #15 names cuBLAS's Hopper GEMMs, this engine's Triton
    kernels and torch's sampling ops by kind, and sums only GPU rows, per step."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    spec = importlib.util.spec_from_file_location("step_kernels", BENCH / "micro" / "step_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.kernel_kind("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT") == "gemm"
    assert mod.kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert mod.kernel_kind("_paged_attention_kernel") == "attention"
    assert mod.kernel_kind("_rms_norm_kernel") == "norm"
    assert mod.kernel_kind("_silu_mul_kernel") == "act"
    assert mod.kernel_kind("_qk_rope_cache_kernel") == "rope_kv"
    assert mod.kernel_kind("void at::native::reduce_kernel<512, 1, ArgMaxOps>") == "sampling"
    assert mod.kernel_kind("Memcpy HtoD (Pageable -> Device)") == "copy"
    assert mod.kernel_kind("void at::native::vectorized_elementwise_kernel<4, AddFunctor>") == "other"

    def ev(key, us, count, dev=DeviceType.CUDA):
        return SimpleNamespace(key=key, device_type=dev, self_device_time_total=us, count=count)

    got = mod.kernel_times([ev("nvjet_a", 3000.0, 10), ev("nvjet_b", 1000.0, 5), ev("_paged_attention_kernel", 500.0, 5),
                            ev("aten::mm", 0.0, 15, DeviceType.CPU), ev("cudaLaunchKernel", 0.0, 30, DeviceType.CPU)],
                           steps=5)
    assert got == {"gemm": {"ms": 0.8, "count": 3.0}, "attention": {"ms": 0.1, "count": 1.0}}


def test_predict_served_prints_one_row_per_policy_with_its_own_profile(capsys, monkeypatch) -> None:
    """predict_served.py simulates each policy on the profile named for it and prints one
    attainment per load; a policy with settings keeps them (split at the last '=')."""
    import sys

    from fairbatch.latency.profiles import shipped_profile

    spec = importlib.util.spec_from_file_location("predict_served", BENCH / "gpu" / "predict_served.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    prof = str(shipped_profile("llama-3-8b", "h100"))      # an installed file (editable install)
    monkeypatch.setattr(sys, "argv", ["predict_served.py", "--trace", "azure-code", "--num", "60", "--scales", "1", "3",
                                      "--seeds", "1", "--policy-profile", f"qoserve={prof}",
                                      "--policy-profile", f"fairbatching:ttft_margin_quantile=0.9={prof}"])
    mod.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| policy", "| qoserve", "| fairbatching:ttft_margin_quantile=0.9"]
    for r in rows[1:]:
        att = [float(x) for x in r.strip("| ").split(" | ")[1:]]
        assert len(att) == 2 and all(0.0 <= a <= 1.0 for a in att) and att[0] >= att[1]
