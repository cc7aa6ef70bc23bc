"""CPU threads on a shared machine (fpdm/cpu_threads.py): passive OpenMP waits set before torch loads in every
script, and the thread count chosen from the cores other processes leave free (bench/bench_shared_cpu.py measures
what both are worth)."""

import ast
import os
import subprocess
import sys
import time

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


@pytest.fixture
def busy_neighbour():
    """A CPU-bound process beside the test (as any background job on a shared machine)."""
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)
    yield
    loop.kill()
    loop.wait()


def display_env(args, **env):
    """stderr of `python args` with OpenMP printing its settings when torch loads it (OMP_DISPLAY_ENV)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    environ.update(OMP_DISPLAY_ENV="VERBOSE", **env)
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=environ, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


@pytest.mark.parametrize("script", ["train.py", "sample.py", "sample_ddp.py", "extract_features.py", "invert.py"])
def test_beside_a_busy_process_each_script_takes_the_free_cores_and_waits_passively(script, busy_neighbour):
    cores = len(os.sched_getaffinity(0))
    shown = display_env([script, "--help"])
    assert "GOMP_SPINCOUNT = '0'" in shown  # passive: a waiting thread sleeps at once
    threads = int(shown.split("OMP_NUM_THREADS = '")[1].split("'")[0])
    assert 1 <= threads <= max(1, cores - 1)  # the busy loop's core is not counted as free
    if script == "train.py":  # the user's choice wins (the same module in every script)
        shown = display_env([script, "--help"], OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="2")
        assert "OMP_WAIT_POLICY = 'ACTIVE'" in shown and "GOMP_SPINCOUNT = '0'" not in shown
        assert "OMP_NUM_THREADS = '2'" in shown


def test_torch_imported_first_would_keep_the_spinning_default(busy_neighbour):
    """The reason for the import order: the same import after torch comes too late (this is what the test above
    and the import-order test guard against)."""
    early = display_env(["-c", "import fpdm.cpu_threads, torch"])
    late = display_env(["-c", "import torch, fpdm.cpu_threads"])
    assert "GOMP_SPINCOUNT = '0'" in early
    assert "GOMP_SPINCOUNT = '0'" not in late and "GOMP_SPINCOUNT" in late


def test_decide_for_a_quiet_a_busy_and_a_shared_machine():
    quiet, busy = (lambda: 0.1), (lambda: 1.2)
    env = {}
    cpu_threads.decide(env, quiet, cores=2)
    assert env == {}  # alone: torch's own threads and OpenMP's default waits (the fastest there)
    env = {}
    _, why = cpu_threads.decide(env, busy, cores=2)
    assert env == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", cpu_threads.INHERITED: why}
    assert "1.2 of 2 cores busy" in why
    child = dict(env)  # a child process inherits the choice and says whose it was
    assert cpu_threads.decide(child, lambda: pytest.fail("measured"), cores=2)[1] == f"as the parent process chose ({why})"
    env = {"LOCAL_WORLD_SIZE": "2"}
    cpu_threads.decide(env, quiet, cores=8)
    assert env["OMP_NUM_THREADS"] == "4" and "OMP_WAIT_POLICY" not in env  # 2 processes share the 8 cores
    assert cpu_threads.INHERITED not in env  # the wait policy is still open: a child decides it itself
    env = {"OMP_NUM_THREADS": "3"}
    cpu_threads.decide(env, busy, cores=8)
    assert env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}  # the user's count, passive waits
    env = {"OMP_NUM_THREADS": "3", "GOMP_SPINCOUNT": "1000"}
    assert cpu_threads.decide(env, lambda: pytest.fail("measured"), cores=8)[0] is None  # both given: not measured


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


def test_configure_reports_on_cpu_only(monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        line = cpu_threads.configure("cpu")
        assert line.startswith("cpu threads 1 (OMP_NUM_THREADS): ") and cpu_threads.REASON in line
        assert cpu_threads.configure("cuda:0") is None
        monkeypatch.delenv("OMP_NUM_THREADS")
        torch.set_num_threads(2)
        assert cpu_threads.configure("cpu", world=2).startswith("cpu threads 1: ")  # 2 processes share torch's 2
    finally:
        torch.set_num_threads(threads)
