"""CPU threads on a shared machine (fpdm/cpu_threads.py): passive OpenMP waits set before torch loads in every
script, and the thread count chosen from the cores other processes leave free (bench/bench_shared_cpu.py measures
what both are worth)."""

import ast
import os
import subprocess
import sys

import pytest
import torch

from fpdm import cpu_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train.py", "sample.py", "sample_ddp.py", "evaluate.py", "extract_features.py", "invert.py", "demo.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_imports_the_wait_policy_before_anything_that_loads_torch(script):
    """OpenMP reads OMP_WAIT_POLICY once, when torch's libgomp loads: an import of cpu_threads after torch (or after
    a module that imports torch) would set it too late, silently."""
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = [(getattr(node, "module", None) or "") + ":" + ",".join(a.name for a in node.names) for node in imports]
    first = next(i for i, n in enumerate(names) if "cpu_threads" in n)
    stdlib = set(sys.stdlib_module_names)
    before = [n for n in names[:first] if n.split(":")[0].split(".")[0] not in stdlib
              and not all(part.split(".")[0] in stdlib for part in n.split(":")[1].split(","))]
    assert not before, f"{script} imports {before} before fpdm.cpu_threads"


@pytest.mark.parametrize("script", ["train.py", "sample.py", "sample_ddp.py", "extract_features.py", "invert.py"])
def test_openmp_in_each_script_spins_zero_times_unless_the_user_chose(script):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(OMP_DISPLAY_ENV="VERBOSE", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "GOMP_SPINCOUNT = '0'" in out.stderr, out.stderr[-2000:]
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # the user's choice wins
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in out.stderr and "GOMP_SPINCOUNT = '0'" not in out.stderr


def test_torch_imported_first_would_keep_the_spinning_default():
    """The reason for the import order: the same import after torch comes too late (this is what the test above
    guards against)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(OMP_DISPLAY_ENV="VERBOSE", OMP_NUM_THREADS="1")
    late = subprocess.run([sys.executable, "-c", "import torch, fpdm.cpu_threads"], env=env, capture_output=True,
                          text=True)
    early = subprocess.run([sys.executable, "-c", "import fpdm.cpu_threads, torch"], env=env, capture_output=True,
                           text=True)
    assert "GOMP_SPINCOUNT = '0'" in early.stderr
    assert "GOMP_SPINCOUNT = '0'" not in late.stderr and "GOMP_SPINCOUNT" in late.stderr


@pytest.mark.parametrize("default, cores, busy, world, expected", [
    (2, 2, 0.0, 1, 2),   # a quiet machine: torch's own choice
    (2, 2, 0.9, 1, 1),   # one busy process beside: the free core
    (2, 2, 1.4, 1, 1),   # rounds to 1 busy core
    (2, 2, 2.0, 1, 1),   # nothing free: still one thread
    (8, 16, 3.0, 1, 8),  # never more than torch's default
    (8, 8, 2.0, 2, 3),   # 6 free cores shared by 2 processes
    (2, 2, None, 1, 2),  # load unknown (no /proc/stat): all cores
])
def test_threads_follow_the_free_cores(default, cores, busy, world, expected):
    assert cpu_threads.choose_threads(default, cores, busy, world) == expected


def test_busy_cores_elsewhere_subtracts_this_process():
    """Busy time of the whole machine over the window, less this process's own CPU time, per second of window."""
    machine = iter([100.0, 100.0 + 0.2 * 1.7])  # 1.7 cores busy in all ...
    own = iter([5.0, 5.0 + 0.2 * 0.7])  # ... 0.7 of them this process
    busy = cpu_threads.busy_cores_elsewhere(0.2, busy_seconds=lambda: next(machine), own_seconds=lambda: next(own),
                                            sleep=__import__("time").sleep)
    assert busy == pytest.approx(1.0, rel=0.1)
    assert cpu_threads.busy_cores_elsewhere(0.01, busy_seconds=lambda: None) is None


def test_configure_sets_torch_threads_on_cpu_only(monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(cpu_threads, "_default_threads", [2])
        line = cpu_threads.configure("cpu", measure=lambda: 1.0)
        assert torch.get_num_threads() == min(2, len(os.sched_getaffinity(0)) - 1 or 1)
        assert line.startswith(f"cpu threads {torch.get_num_threads()} (") and "1.0 busy" in line
        assert cpu_threads.configure("cuda:0", measure=lambda: 1.0) is None
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert "OMP_NUM_THREADS" in cpu_threads.configure("cpu", measure=lambda: 0.0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
