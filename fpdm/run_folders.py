"""Durable files and run folders: atomic writes (the one helper every script uses) and the cleanup of temporaries a
killed process left; for train.py, one writer per run folder (a lock), workers that exit with their launcher, the
stop signals of a scheduler (preemption: checkpoint at the next step, then exit), checkpoint pruning that never
deletes what `latest.json` names, and metrics that hold each step once.

No torch import: these are small file operations, tested on their own.
"""

import csv
import ctypes
import datetime
import fcntl
import os
import re
import signal
import socket
import sys
import threading

CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.pt$")


def atomic_write(path, write, mode="w"):
    """Write through `write(file)` into a temporary file beside `path`, flush it to disk, then rename: a kill at any
    instant leaves either the old file or the complete new one. A write the file system refuses (disk full, quota,
    file too large) is raised as an OSError that names `path` (a file object's write names no file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        try:
            with open(tmp, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if e.filename in (None, tmp) and e.errno is not None:
                raise OSError(e.errno, e.strerror, path) from e
            raise
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, under another user
        return True
    return True


def remove_stale_temporaries(folder):
    """Delete `atomic_write` temporaries (`*.tmp-PID`) that a killed process left in `folder`, when a run starts (it
    has written nothing yet: a temporary of its own PID is a killed one's, which a container's fresh PID namespace
    hands out again); those of other processes still running on this machine are kept. Their names end in the PID,
    so no image reader counts them as images. Returns {name: size in bytes} of the deleted files."""
    removed = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        stem, sep, pid = name.rpartition(".tmp-")
        if not (sep and pid.isdigit()):
            continue
        if int(pid) != os.getpid() and _process_alive(int(pid)):
            continue  # another writer's file in progress
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        os.remove(path)
        removed[name] = size
    return removed


LOCK_FILE = ".lock"  # RunLock's file in the folder it locks


class RunLock:
    """An exclusive lock on a run folder for the lifetime of the run (`flock` on `<run>/.lock`, which names the owner's
    host, PID and a random token): train.py's run folders, sample_ddp.py's sample folders, extract_features.py's
    latent folders. The kernel releases it when the owner dies, so a lock left by a killed run is taken over (and
    `previous_owner` says whose it was); a live owner makes `acquire` fail with one line naming it. Where flock does
    not reach across machines (Lustre's localflock, BeeGFS, NFS with local_lock) or does not exist (Lustre's noflock:
    `unlocked`, with a warning), two runs on different machines can both start: `check_held` before every checkpoint write stops the one
    whose name is no longer in the file."""

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.previous_owner = None
        self.unlocked = None  # why this file system gave no lock (the owner is still written and checked)
        self._file = None

    _owners = {}  # per process: its owner string, made once

    @classmethod
    def owner(cls):
        """This process's name in .lock: host, PID and a random token, fixed for the process's life (a hostname that
        changes mid-run, or containers with the same hostname and PID numbering, are not another owner / the same
        owner)."""
        pid = os.getpid()
        if pid not in cls._owners:
            import secrets
            cls._owners[pid] = f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}"
        return cls._owners[pid]

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise FileExistsError(f"{os.path.dirname(self.path)} is in use by another run ({owner}): wait for it to "
                                  f"finish or stop it, or choose another name (if that machine is down, delete "
                                  f"{self.path} to take over now)") from None
        except OSError as e:  # ENOSYS, ENOLCK, EOPNOTSUPP: no flock on this file system
            self.unlocked = f"{os.strerror(e.errno)} (errno {e.errno})"
        handle.seek(0)
        self.previous_owner = handle.read().strip() or None  # written by a run that did not exit cleanly
        handle.seek(0)
        handle.truncate()
        handle.write(self.owner())
        handle.flush()
        self._file = handle
        return self

    @classmethod
    def check_held(cls, run_dir):
        """Raise FileExistsError (one line) if `<run_dir>/.lock` names another owner than this process: another run
        took the folder over (see the class). Called before each checkpoint write, so that two runs never write
        their checkpoints into one folder. Without a lock file there is nothing to check."""
        try:
            with open(os.path.join(run_dir, LOCK_FILE)) as f:
                owner = f.read().strip()
        except FileNotFoundError:
            return
        if owner != cls.owner():
            raise FileExistsError(f"{run_dir} was taken over by {owner or 'another run'} while this run "
                                  f"({cls.owner()}) held it (a file system whose locks do not reach across machines): "
                                  f"this run stops without writing; give each job its own --run-name")

    def release(self):
        if self._file is not None:
            try:
                self._file.seek(0)
                if self._file.read().strip() == self.owner():  # not another job's name (a lock local to a machine)
                    self._file.seek(0)
                    self._file.truncate()  # a clean exit leaves no owner behind
            except OSError:  # a read-only or vanished folder: the kernel drops the flock all the same
                pass
            finally:
                self._file.close()  # closing releases the flock
                self._file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def exit_with_parent(sig=signal.SIGTERM):
    """Linux: ask the kernel to send `sig` to this process when its parent dies, so that workers of a killed
    `accelerate launch` / torchrun do not train on as orphans (in train.py's loop SIGTERM is a stop signal: the
    workers checkpoint their next step and exit, `StopSignals`). Returns False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(sig), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)
    return True


def check_writable(folder, flag):
    """Make sure `folder` can be made and written before any work, creating nothing: one line saying what to do
    instead of a traceback (a file where the folder should be or above it, a read-only or unwritable place). A
    probe file is written and removed in `folder`, or in its nearest existing parent when it does not exist yet
    (each process its own probe: processes of a launch may check at once). `flag` names the option, e.g.
    "--results-dir"."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"{flag} {folder} is a file: choose a folder")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise FileExistsError(f"{flag} {folder} lies under the file {existing}: choose a folder")
    probe = os.path.join(existing, f".write-test-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{flag} {folder} cannot be written ({e.strerror or type(e).__name__}): choose a folder you "
                         f"can write to") from None


def exit_with_error(error, code=1):
    """The end of a script that refuses: `error: <message>` on stderr once (by the main process of a launch: rank 0,
    or a process started without a launcher; an OSError by the other processes too, as `error (rank N): ...`: it may
    be that machine's alone), and under torchrun / `accelerate launch` also in the worker's error file, which the
    launcher's failure summary prints as its root cause instead of "To enable traceback see ..."."""
    import json
    import time
    line = f"error: {error}"
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        print(line, file=sys.stderr, flush=True)
    elif isinstance(error, OSError):  # a file on this process's machine, perhaps this process's alone
        print(f"error (rank {rank}): {error}", file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                      "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass  # the launcher then shows its own summary: the line above is still on stderr
    sys.exit(code)


# The signals a scheduler sends ahead of a kill: SIGTERM (Slurm's preemption and time limit, `scancel`, torchrun
# forwarding its own), SIGUSR1 (`sbatch --signal=USR1@90`, N seconds before the time limit).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# The exit code of a process that stopped on one of them with its work saved (train.py, sample_ddp.py): a job
# requeued on it continues with the same command. (Not 124, timeout's code, nor 1, an error; 128 + n would read as
# "killed by signal n".)
STOPPED_EXIT_CODE = 3
# How long a collective (barrier, all-reduce) waits for processes that are busy on their own (NCCL's default: 10
# minutes), in train.py, sample_ddp.py and extract_features.py. At ImageNet scale that is far exceeded: process 0
# lists the images or clears an old extraction, computes FID's reference statistics, assembles a 50k-image
# samples.npz; after a resume one process may have many shards or batches left when another has none. A process that
# fails stops the others of its machine through the launcher (accelerate launch, torchrun), not through this timeout;
# on several machines each launcher watches only its own processes, so the others are stopped by the job's launcher
# (Slurm: `srun --kill-on-bad-exit=1`, docs/training.md), or wait in their next collective until this timeout.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=24)
# train.py's once its start is over: between two collectives of the step loop a process works at most through a
# checkpoint write by the main process (11 GB at DiT-XL/2: minutes on slow storage), a preview or one evaluation
# chunk. A process that hangs there (a stuck GPU, a hard-mounted file system) stops the job after this long, not 24 h.
STEP_LOOP_TIMEOUT = datetime.timedelta(hours=1)


def set_collective_timeout(timeout):
    """From now on, every collective of the default process group gives up after `timeout` (NCCL: aborts and the
    process exits, so the launcher ends the job). Returns whether one was set (False without a process group)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.set_timeout(timeout)
    return True


def from_main_process(state, compute):
    """`compute()` run by the main process alone, its value (any picklable object) sent to every process: one reading
    of what may change between two reads (a live run's latest.json, a CSV being written) and one pass of what is
    costly to repeat (hashing a 10.8 GB checkpoint). `state`: accelerate's PartialState or Accelerator."""
    box = [compute() if state.is_main_process else None]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        broadcast_object_list(box)
    return box[0]


class StopSignals:
    """While in the `with` block, SIGTERM and SIGUSR1 ask the training loop to stop at its next step boundary instead
    of ending the process: the handler only records the first signal's number (`received`; no I/O, nothing that could
    deadlock in a handler), a second signal changes nothing. The loop reads `received` once per step. On exit the
    previous handlers are back. Outside the main thread (where Python cannot install handlers) it does nothing.
    `notify(callback)`: from then on the first signal also calls callback(signum) (at once if one came already), for
    a phase that no loop polls (Python runs the handler in the main thread, between bytecodes, so it may write)."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals, self.received, self._previous, self._callback = tuple(signals), 0, {}, None

    def _handler(self, signum, frame):
        if not self.received:
            self.received = signum
            if self._callback is not None:
                self._callback(signum)

    def notify(self, callback):
        """callback(signum) on the first signal from now on (None: no longer)."""
        self._callback = callback
        if self.received and callback is not None:
            callback(self.received)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: not set from Python
        self._previous = {}


def ignore_stop_signals(*_):
    """DataLoader `worker_init_fn`: a loader worker ignores the stop signals (a scheduler signals every process of the
    job, workers included; one killed by it would fail the training process), and stops when its loader does."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def checkpoint_steps(ckpt_dir):
    """{step: file name} of the `step_NNNNNNN.pt` files in `ckpt_dir`."""
    found = {}
    for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        match = CHECKPOINT_NAME.match(name)
        if match:
            found[int(match.group(1))] = name
    return found


def prune_checkpoints(ckpt_dir, current_step, keep_last, keep_every=0):
    """After writing step `current_step`: keep it and the `keep_last − 1` newest checkpoints of earlier steps; delete
    older ones, except those at multiples of `keep_every` (milestones, never deleted; 0: none). Checkpoints of later
    steps (left by a run that was resumed from an earlier checkpoint) are not touched: this run overwrites them when
    it gets there. Returns the deleted file names."""
    names = checkpoint_steps(ckpt_dir)
    earlier = sorted(step for step in names if step < current_step and not (keep_every and step % keep_every == 0))
    doomed = earlier[:max(0, len(earlier) - (keep_last - 1))]
    for step in doomed:
        os.remove(os.path.join(ckpt_dir, names[step]))
    return [names[step] for step in doomed]


def sync_files(paths):
    """fsync the files of `paths` that exist: rows appended before a checkpoint reach the disk before it does, so that
    a machine that crashes after the checkpoint loses none of the rows it covers."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def truncate_metrics(path, last_step):
    """Before a run continues from the checkpoint of `last_step`: keep the complete rows of a run's CSV (metrics.csv,
    eval.csv, fp_diagnostics.csv) up to that step, atomically. Rows after it (logged after the last checkpoint) are
    logged again by the resumed run; a row a crash cut off — no line end, the NUL bytes some file systems leave where
    a write was lost, another number of fields than the header, a step that is not a number — is dropped, so that no
    torn value is read as a result and the next row starts on a line of its own. A file whose header itself is
    incomplete is removed (its writer starts it again). Returns how many rows were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path, newline="") as f:
        lines = f.read().split("\n")  # the last item is what follows the last line end: "" unless cut off
    complete = [line for line in lines[:-1] if "\x00" not in line]
    torn = (len(lines) - 1 - len(complete)) + (lines[-1] != "")  # lines cut off or holding NULs
    if not complete or "\x00" in lines[0] or len(lines) == 1:  # no complete header
        os.remove(path)
        return max(0, len(lines) - 2)
    header, *body = list(csv.reader(complete))

    def keep(row):
        try:
            return len(row) == len(header) and int(float(row[0])) <= last_step
        except ValueError:
            return False
    kept = [row for row in body if keep(row)]
    if len(kept) == len(body) and not torn:
        return 0
    atomic_write(path, lambda f: csv.writer(f).writerows([header, *kept]))
    return len(body) - len(kept) + torn
