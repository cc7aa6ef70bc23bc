"""bench/: one `bench/run.py --quick` run (every benchmark, tiny sizes) checked for what the numbers must satisfy, the
steady-state throughput of bench_train, and the one-line error when a benchmark fails."""

import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_script(name):
    """A bench/ script loaded as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_train = bench_script("bench_train")
bench_run = bench_script("run")


# The train benchmark (two training subprocesses, ~25 s) is left out of the smoke run; its steady-state arithmetic and
# its refusal of too few steps are tested below.
SMOKE = ("model", "sampling", "parallel", "hotpath")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--device", "cpu",
                           "--only", ",".join(SMOKE), "--out-dir", str(out_dir)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out_dir / "all.json") as f:
        return json.load(f), proc.stdout


def test_every_benchmark_and_ratio_is_reported(quick):
    report, stdout = quick
    assert set(report["results"]) == set(SMOKE) and set(SMOKE) <= set(bench_run.BENCHMARKS)
    assert {r["benchmark"] for r in report["ratios"]} == set(SMOKE)
    assert report["device"].startswith("CPU") and report["torch"] and report["date"]
    for r in report["ratios"]:
        assert math.isfinite(r["value"]) and r["value"] >= 0, r
        assert r["meaning"], f"no explanation for {r['benchmark']} / {r['ratio']}"
        assert r["ratio"] in stdout  # the printed table holds every row of the JSON
    for name in ("model", "sampling", "hotpath"):  # every ratio a benchmark wrote made it into the combined table
        listed = {r["ratio"] for r in report["ratios"] if r["benchmark"] == name}
        assert listed == set(report["results"][name]["ratios"])


def test_model_ratios(quick):
    ratios = quick[0]["results"]["model"]["ratios"]
    assert ratios["fpdm/dit params"] < 1
    # The no-grad phase saves nothing for backward; the release-style one saves every iteration (exact, not timed).
    assert ratios["ours/release-style saved activations"] < 1


def test_sampling_budgets(quick):
    result = quick[0]["results"]["sampling"]
    args, rows = result["args"], result["rows"]
    full = args["steps"] * args["depth"]
    for name in ("dit", "fpdm", "fpdm_reuse"):  # equal budgets: the block evaluations actually run are equal
        assert rows[name]["block_evals_per_image"] == full
    assert sum(rows["fpdm"]["iterations_per_step"]) + 2 * args["steps"] == full  # pre + post blocks every step
    assert rows["fpdm_low"]["block_evals_per_image"] == round(full * args["low_budget"])
    assert result["ratios"]["low/full budget block evals"] == pytest.approx(args["low_budget"], abs=0.02)
    assert result["ratios"]["fpdm/dit FLOPs (same block evals)"] > 1  # each iteration also runs the projection MLP
    assert rows["fpdm"]["params"] < rows["dit"]["params"]
    assert rows["fpdm"]["max_abs_diff_to_fpdm"] == 0 and rows["fpdm_reuse"]["max_abs_diff_to_fpdm"] > 0  # reuse on


def test_parallel_rows(quick):
    result = quick[0]["results"]["parallel"]
    solvers = result["args"]["solvers"].split(",")
    assert [r["solver"] for r in result["rows"]] == solvers
    assert all(r["network_evaluations"] >= r["steps"] for r in result["rows"])  # at least one pass over every state
    assert len([r for r in quick[0]["ratios"] if r["benchmark"] == "parallel"]) == len(solvers)
    for r in result["rows"]:  # the returned sample: Picard's h(X) of its best iterate, Anderson's X
        if r["solver"] in ("picard", "anderson"):
            chosen = r["max_abs_diff_its_h" if r["solver"] == "picard" else "max_abs_diff_best_iterate"]
            assert r["max_abs_diff"] == chosen


def test_hotpath_figures(quick):
    """Rank-synchronous S-JFB draws remove the straggler slowdown (≈ 1.6x on 8 ranks with per-rank draws); host syncs
    are exactly the NaN guard per step plus 2 reads per log row (10 steps, 2 rows: loss and residual in one
    all-reduce, gradient norm), 1 per diagnostics row (the per-timestep residual table, at the last step) and 1
    listing of the data order, and none while sampling."""
    result = quick[0]["results"]["hotpath"]
    assert 1.4 < result["straggler"]["before"]["ratio"] < 1.8 and result["straggler"]["after"]["ratio"] == 1.0
    assert result["train_syncs"]["total"] == 10 + 2 * 2 + 1 + 1 and result["train_syncs"]["per_step"] == 1.6
    assert result["sample_syncs"]["during_sampling"] == 0 and result["sample_syncs"]["reading_the_report"] == 1


def test_steady_state_skips_the_first_window(tmp_path):
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "steps_per_s", "peak_mem_mb"])
        writer.writerows([[10, 0.1, 100], [20, 2.0, 300], [25, 1.0, 400]])  # slow warm-up, then 5 s + 5 s
    images_per_s, peak = bench_train.steady_state(path, batch_size=4)
    assert images_per_s == pytest.approx((10 + 5) * 4 / (5 + 5))
    assert peak == 400 * 2**20


def test_failing_benchmark_names_itself_and_its_command(tmp_path, monkeypatch):
    # Fewer steps than two log windows: bench_train refuses before it starts any training.
    monkeypatch.setitem(bench_run.QUICK_FLAGS, "train", bench_run.QUICK_FLAGS["train"] + ["--steps", "1"])
    monkeypatch.setattr(sys, "argv", ["run.py", "--quick", "--device", "cpu", "--only", "train",
                                      "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main()
    message = str(exit_info.value.code)
    assert message.startswith("error: benchmark 'train' failed (exit 2)") and "\n" not in message
    assert "bench_train.py" in message and "--steps 1" in message
    assert not (tmp_path / "all.json").exists()


def test_unknown_benchmark_is_refused():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--only", "model,nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_gpu_benchmark_dry_run(tmp_path):
    """bench/gpu.py, the one command for a GPU lease, at tiny sizes on the CPU: every section but the compiled one
    (torch.compile's regional path is tested in test_models.py; here it would add ~40 s) finishes and reports what
    the README's GPU table needs, issue 27's scale checks among it (sampling per precision, the FPDM diagnostics, the
    VAE, a training checkpoint written and read back) with their rows in the printed table; a CPU run at full sizes
    is refused with a one-line error."""
    out = tmp_path / "gpu.json"
    sections = "train-eager,sjfb,sampling,precision,latency,parallel,two-axis,residual,diagnostics,vae,checkpoint"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--device", "cpu", "--tiny",
                           "--sections", sections, "--out", str(out), "--scratch", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "expected about" in proc.stdout and "at most" in proc.stdout  # the time estimate and the caps
    report = json.load(open(out))
    assert list(report["sections"]) == sections.split(",") and report["device"] == "cpu"
    train = report["sections"]["train-eager"]
    for variant in ("dit", "fpdm"):
        assert train[variant]["images_per_s"] > 0 and train[variant]["tflops_per_step"] > 0
    assert train["fpdm"]["params"] < train["dit"]["params"] and len(train["fpdm"]["sjfb_draws"]) == 3
    sjfb = report["sections"]["sjfb"]  # ours vs the release's style, same step: its ratio and each one's profile
    assert sjfb["ours/release-style step time"] == sjfb["ours"]["step_s"] / sjfb["release-style"]["step_s"] > 0
    for variant in ("ours", "release-style"):
        kernels = sjfb[variant]["top_kernels"]
        assert len(kernels) == 10 and any("mm" in k["name"] for k in kernels) and kernels[0]["ms"] > 0
    assert re.search(r"^sjfb: .* s  ours [\d.]+ ms, release-style [\d.]+ ms a step \(ratio ", proc.stdout, re.M)
    sampling = report["sections"]["sampling"]
    assert sampling["fpdm"]["block_evals"] == sampling["dit"]["block_evals"]  # equal budgets
    parallel = report["sections"]["parallel"]
    assert parallel["sequential/parallel time"] > 0 and parallel["sequential/parallel-sync4 time"] > 0
    assert parallel["parallel-sync1"]["info"]["host_reads"] >= parallel["parallel-sync4"]["info"]["host_reads"]
    latency = report["sections"]["latency"]
    for row in ("dit-batch1", "dit-batch4", "fpdm-batch1", "fpdm-batch4"):  # emulated graphs: eager's samples
        assert latency[row]["max_abs_difference"] == 0 and latency[row]["eager/graphs time"] > 0
    assert latency["dit-batch1"]["graphs_captured"] == 1  # one call shape for every step
    assert latency["fpdm-batch1"]["graphs_captured"] == 2  # reuse: the first step has no solution coming in
    two_axis = report["sections"]["two-axis"]
    steps = 4  # TINY's sample_steps
    assert two_axis["sequential"]["critical_path_calls"] == steps and two_axis["sequential/two-axis time"] > 0
    assert two_axis["two-axis"]["critical_path_calls"] == two_axis["two-axis"]["info"]["outer_iterations"]
    residual = report["sections"]["residual"]
    assert residual["fp32"]["floor"] < 1e-5 and residual["fp32"]["floor"] <= residual["bf16"]["floor"] < 1e-2
    precision = report["sections"]["precision"]
    for name in ("fp32", "tf32", "bf16+tf32"):  # the names sample.py's args.json gives its precisions
        row = precision[name]
        assert row["images_per_s"] > 0 and row["cfg_passes"] == 2  # guidance: the batch doubled
        assert row["fid50k_hours_8gpus"] == pytest.approx(50_000 * 250 * row["ms_per_image_step"] / 1e3 / 8 / 3600)
    assert precision["tf32"]["max_abs_diff_to_fp32"] == 0  # the CPU ignores TF32; the same DDPM draws in every run
    assert 0 < precision["bf16+tf32"]["max_abs_diff_to_fp32"] < 10
    assert precision["bf16+tf32/fp32 images_per_s"] > 0 and precision["tf32/fp32 images_per_s"] > 0
    # bf16 weights cast once (as sample.py holds them) give autocast's per-call casts' samples
    per_call = precision["bf16+tf32 per-call casts"]
    assert per_call["max_abs_diff_to_fp32"] == precision["bf16+tf32"]["max_abs_diff_to_fp32"] > 0
    assert precision["bf16 weights cast once/per call images_per_s"] > 0
    diagnostics = report["sections"]["diagnostics"]
    assert diagnostics["contraction_s"] > 0 and diagnostics["rho"] > 0 and diagnostics["probe_batch"] == 10
    assert diagnostics["settle_iterations"] == 2 * (10 + 12) and diagnostics["power_iterations"] == 20
    assert diagnostics["plot_rows"] == 200 and diagnostics["plot_s"] > 0
    vae = report["sections"]["vae"]
    assert vae["latent_shape"] == [4, 8, 8]  # 16 px through one downsampling level
    for name in ("fp32", "tf32", "bf16+tf32"):
        assert vae[name]["encode_images_per_s"] > 0 and vae[name]["decode_images_per_s"] > 0
    checkpoint = report["sections"]["checkpoint"]
    assert checkpoint["gb"] > 0 and checkpoint["write_gb_per_s"] > 0 and checkpoint["filesystem"]
    assert 0 < checkpoint["read_s"] <= checkpoint["restore_s"] and checkpoint["rss_peak_growth_gb"] >= 0
    assert checkpoint["anonymous_peak_growth_gb"] is not None and checkpoint["page_cache_dropped"]
    table = report["scale_table"]
    assert len(table) == 2 * 3 + 2 + 3 + 2  # per precision sampling and the 50k projection; diagnostics; VAE; I/O
    for what, value in table:
        assert what in proc.stdout and value in proc.stdout
    assert "+ VAE decode" in proc.stdout  # the 50k projection with the vae section's decode rate added
    refused = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--device", "cpu"],
                             capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "need a GPU" in refused.stderr


def test_gpu_benchmark_kills_a_section_with_its_children_and_keeps_a_report_when_time_runs_out(tmp_path):
    """A lease is short and ends from outside: a section over its cap is killed with every process it started
    (torch.compile's workers), the report is written after every section, and sections that no longer fit in
    --deadline are recorded as not run instead of overrunning the lease."""
    gpu = bench_script("gpu")
    pid_file = tmp_path / "grandchild.pid"
    spawn = ("import subprocess, sys, time; "
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    error = gpu.run_capped([sys.executable, "-c", spawn], 3, dict(os.environ))
    assert error == "timed out after its cap of 3 s"
    grandchild = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # gone, not orphaned (and not a zombie either: init reaps it)
        for _ in range(50):
            os.kill(grandchild, 0)
            import time
            time.sleep(0.1)
    assert gpu.run_capped([sys.executable, "-c", "raise SystemExit(3)"], 30, dict(os.environ)) == "exit 3"

    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--device", "cpu", "--tiny",
                           "--sections", "residual,vae", "--deadline", "5", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and "residual, vae did not finish" in proc.stderr
    report = json.load(open(out))
    assert report["deadline_s"] == 5
    for section in ("residual", "vae"):
        assert report["sections"][section]["error"].startswith("not run: ")


def test_gpu_benchmark_formats_a_section_that_stopped_early():
    """A section killed at its cap keeps what it measured, without the ratios computed at its end: the scale table
    shows the rows it can (before, a KeyError there ended the driver and every section after it), and a summary
    that cannot be formatted is replaced by a note instead of stopping the run."""
    gpu = bench_script("gpu")
    partial = {"model": "DiT-XL/2", "batch": 32,
               "fp32": {"images_per_s": 1.0, "max_abs_diff_to_fp32": 0.0, "fid50k_hours_8gpus": 5.0},
               "tf32": {"images_per_s": 2.0, "max_abs_diff_to_fp32": 1e-3, "fid50k_hours_8gpus": 2.5}}
    rows = dict(gpu.scale_table({"precision": partial}))
    assert rows["DiT-XL/2 sampling, DDPM + guidance, batch 32: tf32"].startswith("2.00 img/s, max |diff|")
    assert gpu.formatted(gpu.summary, "latency", {"dit-batch1": {}}, default="note") == "note"
    assert gpu.formatted(gpu.summary, "residual", {"fp32": {"floor": 1e-6}, "bf16": {"floor": 1e-3}},
                         default="note").startswith("fp32 floor 1.0e-06")


def test_gpu_peak_flops_by_device_name():
    """MFU's denominator: the longest matching part of torch's device name, so NVL and PCIe cards are not taken for
    SXM ones."""
    gpu = bench_script("gpu")
    assert gpu.peak_key("NVIDIA H100 80GB HBM3") == "H100" and gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA H100 NVL") == gpu.peak_tflops("NVIDIA H200 NVL") == 835.5
    assert gpu.peak_tflops("NVIDIA H200") == 989.4 and gpu.peak_tflops("Quadro K600") is None


def test_gpu_benchmark_skips_the_compiled_section_where_torch_compile_cannot_build(tmp_path):
    """A GPU machine without a C compiler or Python's headers (Triton builds its launcher at run time): the compiled
    section is recorded as skipped with the reason, after a one-line probe, instead of failing after ~20 s of building
    XL/2 models."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--device", "cpu", "--tiny",
                           "--sections", "train-compiled", "--out", str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "CXX": "/bin/false",
                                                      "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    section = json.load(open(out))["sections"]["train-compiled"]
    assert section["skipped"].startswith("torch.compile does not build here (") and "dit" not in section
