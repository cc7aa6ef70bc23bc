"""CPU threads on a shared machine: OpenMP threads that wait passively, as many as there are free cores.

torch's CPU kernels run on an OpenMP pool whose threads, by GNU OpenMP's default, spin for a while at every barrier
before they sleep. Beside another CPU-bound process (a background job on a small VM, a shared login node) the
spinning threads and the other process take turns on the same cores, and a training step of `make demo` took 3.5x
its time alone instead of the 1.5x a fair share predicts (bench/bench_shared_cpu.py, bench/results/shared_cpu.json).
Two things fix it:

  - OMP_WAIT_POLICY=PASSIVE: a waiting thread sleeps at once. OpenMP reads it when torch loads, so every script
    imports this module before torch (which sets it unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set already). It
    changes no arithmetic; alone on 2 cores it was as fast as the default (0.94-1.0x).
  - `configure(device)`: on a CPU run, as many threads as there are cores that other processes leave free, measured
    over a fifth of a second at start (/proc/stat less this process's own CPU time), at least 1, at most torch's
    default. With N processes (accelerate launch), the free cores are shared among them.

OMP_NUM_THREADS, when set, wins over both choices (and fixes float summation order: results are bit-reproducible
only for a fixed thread count, so pin it when comparing runs bit for bit). GPU runs are left as they are.
"""

import os
import time

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

WINDOW_S = 0.2
_default_threads = []  # torch's own choice, read once per process (configure may run more than once)


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


def configure(device, world=1, measure=busy_cores_elsewhere):
    """Set torch's CPU threads for a run on `device` (a torch.device or its name) and return one line saying what
    was chosen and why, or None on a GPU (left as is)."""
    import torch

    if str(device).split(":")[0] != "cpu":
        return None
    policy = os.environ.get("OMP_WAIT_POLICY") or f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"cpu threads {torch.get_num_threads()} (OMP_NUM_THREADS; OpenMP wait policy {policy})"
    if not _default_threads:
        _default_threads.append(torch.get_num_threads())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = measure()
    threads = choose_threads(_default_threads[0], cores, busy, world)
    torch.set_num_threads(threads)
    seen = "load unknown" if busy is None else f"{busy:.1f} busy with other processes"
    share = f", {world} processes" if world > 1 else ""
    return (f"cpu threads {threads} ({cores} cores, {seen}{share}; OpenMP wait policy {policy}; "
            f"OMP_NUM_THREADS=N pins it)")
