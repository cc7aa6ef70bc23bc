"""CPU threads on a shared machine: as many OpenMP threads as there are free cores, waiting passively when the
machine is busy.

torch's CPU kernels run on an OpenMP pool whose threads, by GNU OpenMP's default, spin for a while at every barrier
before they sleep. Alone on the machine that is the fastest; beside another CPU-bound process (a background job on a
small VM, a shared login node) the spinning threads and the other process take turns on the same cores, and a
training step of `make demo` took 3.0-4.3x its time alone instead of the 1.5x a fair share predicts
(bench/bench_shared_cpu.py, bench/results/shared_cpu.json). So every script imports this module before torch, and
it looks at the machine once, for a fifth of a second (/proc/stat less this process's own CPU time):

  - cores busy with other processes: OMP_NUM_THREADS = the free cores (at least 1; with N processes on this node,
    LOCAL_WORLD_SIZE, shared among them), and OMP_WAIT_POLICY=PASSIVE (a waiting thread sleeps at once);
  - a quiet machine: torch's own thread count and OpenMP's default waits (with N processes, the cores shared).

OpenMP reads these variables once, when torch loads it, hence the import order (tests check it in every script);
torch.set_num_threads later would be too late for part of the work (measured ~10% slower than the variable). A user's
OMP_NUM_THREADS, OMP_WAIT_POLICY or GOMP_SPINCOUNT always wins (and pins float summation order: bit-identical
reruns need the same thread count). Child processes inherit the choice. GPU runs are not affected in any way that
matters (their CPU threads only feed the GPU).
"""

import os
import time

WINDOW_S = 0.2
INHERITED = "FPDM_CPU_THREADS_CHOICE"  # set with the variables this module chose, for child processes to report


def _busy_seconds():
    """CPU seconds that all cores of this machine have been busy since boot (/proc/stat's first line), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds():
    t = os.times()
    return t.user + t.system


def busy_cores_elsewhere(window=WINDOW_S, busy_seconds=_busy_seconds, own_seconds=_own_seconds, sleep=time.sleep):
    """How many cores other processes keep busy, averaged over `window` seconds (None where /proc/stat is missing)."""
    start, own = busy_seconds(), own_seconds()
    if start is None:
        return None
    began = time.perf_counter()
    sleep(window)
    elapsed = time.perf_counter() - began
    end, own_end = busy_seconds(), own_seconds()
    if end is None or elapsed <= 0:
        return None
    return max(0.0, (end - start) - (own_end - own)) / elapsed


def choose_threads(default, cores, busy_elsewhere, world=1):
    """Threads for one of `world` processes: the cores not busy elsewhere (rounded), shared evenly, within
    [1, default]."""
    free = cores if busy_elsewhere is None else cores - round(busy_elsewhere)
    return max(1, min(default, free // max(world, 1)))


def decide(environ=os.environ, measure=busy_cores_elsewhere, cores=None):
    """Set OMP_NUM_THREADS and OMP_WAIT_POLICY in `environ` for the load seen now, where the user set neither;
    returns (busy cores elsewhere or None, a line saying why)."""
    threads_given = bool(environ.get("OMP_NUM_THREADS"))
    wait_given = bool(environ.get("OMP_WAIT_POLICY") or environ.get("GOMP_SPINCOUNT"))
    if threads_given and wait_given:
        inherited = environ.get(INHERITED)
        return None, (f"as the parent process chose ({inherited})" if inherited else
                      "OMP_NUM_THREADS and the OpenMP wait policy as given")
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    world = max(1, int(environ.get("LOCAL_WORLD_SIZE") or 1))
    busy = measure()
    loaded = busy is not None and round(busy) >= 1
    if not threads_given and (loaded or world > 1):
        environ["OMP_NUM_THREADS"] = str(choose_threads(cores, cores, busy, world))
    if not wait_given and loaded:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
    seen = "load unknown" if busy is None else f"{busy:.1f} of {cores} cores busy with other processes"
    share = f", {world} processes on this node" if world > 1 else ""
    waits = ("passive OpenMP waits" if environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else
             "OpenMP waits as given" if wait_given else "OpenMP's default waits")
    reason = f"{seen}{share}; {waits}"
    if not threads_given and not wait_given and "OMP_NUM_THREADS" in environ and "OMP_WAIT_POLICY" in environ:
        environ[INHERITED] = reason  # children inherit both variables and decide nothing: they say whose choice
    return busy, reason


_, REASON = decide()


def configure(device, world=1):
    """One line saying how many CPU threads this process uses and why, or None on a GPU. (The choice was made when
    this module was imported; with `world` processes and no OMP_NUM_THREADS, torch's threads are shared here.)"""
    import torch

    if str(device).split(":")[0] != "cpu":
        return None
    if world > 1 and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    pinned = " (OMP_NUM_THREADS)" if os.environ.get("OMP_NUM_THREADS") else ""
    return f"cpu threads {torch.get_num_threads()}{pinned}: {REASON}; OMP_NUM_THREADS=N pins it"
