"""Faults of shared cluster file systems and crashed machines, each met without losing or corrupting results: rows
a crash cut off in a run's CSVs, file systems whose locks do not reach across machines (or that have none), a
container's PID handed out again, two jobs on one sample or latent folder, a cut-off .safetensors file, an
unwritable cache."""

import errno
import fcntl
import os

import numpy as np
import pytest

from conftest import reset_accelerate
from fpdm.run_folders import RunLock, remove_stale_temporaries, truncate_metrics
from test_data import folder, vae_dir  # noqa: F401 (fixtures: a small image folder, a random SD-style VAE)
from test_sampling import checkpoint, ddp_args, sample_ddp  # noqa: F401 (the module-scoped checkpoint fixture)
from test_train import run as train_run


def raw(path):
    with open(path, newline="") as f:
        return f.read()


def csv_rows(path):
    with open(path, newline="") as f:
        return [line.rstrip("\r\n").split(",") for line in f]


@pytest.mark.parametrize("damage", ["cut off mid-row", "NUL bytes", "another number of fields", "a torn header"])
def test_rows_a_crash_cut_off_are_dropped_before_a_run_continues(tmp_path, damage):
    """A row without its line end, with the NULs XFS or Lustre leave where a write was lost, or with the wrong
    number of fields is never kept: kept, it was read as a result (a truncated FID), or the next append was glued to
    it (two rows in one), or plotting it crashed the run after every resume."""
    path = tmp_path / "eval.csv"
    good = "step,metric,value\r\n100,fid,9.87\r\n"
    tails = {"cut off mid-row": "200,fid,9", "NUL bytes": "\x00" * 40, "another number of fields": "200,fid\r\n",
             "a torn header": None}
    path.write_text(good + tails[damage] if tails[damage] is not None else "step,met", newline="")
    dropped = truncate_metrics(str(path), 10_000)
    if damage == "a torn header":
        assert not path.exists()  # its writer starts it again
        return
    assert dropped == 1 and raw(path) == good
    assert truncate_metrics(str(path), 10_000) == 0  # a clean file is left alone


def test_a_resume_after_a_crash_that_tore_the_csvs_logs_on_in_whole_rows(tmp_path):
    """End to end: a run whose metrics.csv lost the end of its last row and whose fp_diagnostics.csv got a NUL tail
    (a machine that crashed) resumes, and every row of both files is whole."""
    train_run(tmp_path, "--max-steps", "4", "--ckpt-every", "4", "--fp-diagnostics-every", "2", "--sample-every", "0")
    reset_accelerate()
    run_dir = tmp_path / "run"
    metrics, diagnostics = run_dir / "metrics.csv", run_dir / "fp_diagnostics.csv"
    text = raw(metrics)
    metrics.write_text(text[:-12], newline="")  # step 4's row cut off
    with open(diagnostics, "ab") as f:
        f.write(b"\x00" * 64)
    train_run(tmp_path, "--max-steps", "6", "--ckpt-every", "4", "--fp-diagnostics-every", "2", "--sample-every", "0",
              "--resume", "auto")
    rows = csv_rows(metrics)
    assert all(len(row) == len(rows[0]) for row in rows)
    assert [int(row[0]) for row in rows[1:]] == [1, 2, 3, 5, 6]  # step 4's torn row is gone, not glued to step 5's
    rows = csv_rows(diagnostics)
    assert all(len(row) == len(rows[0]) for row in rows) and [int(r[0]) for r in rows[1:]] == [2, 4, 6]


def test_a_run_whose_folder_another_machine_took_over_stops_before_its_next_checkpoint(tmp_path, monkeypatch):
    """Where flock is local to a machine (Lustre localflock, BeeGFS, NFS local_lock), a second job on another machine
    gets the lock too and writes its name into .lock: the first stops in one line at its next checkpoint instead of
    writing checkpoints into the same folder."""
    from diffusion.gaussian_diffusion import GaussianDiffusion
    real, calls = GaussianDiffusion.training_losses, {"n": 0}

    def taken_over_at_step_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            (tmp_path / "run" / ".lock").write_text("othernode:4242")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(GaussianDiffusion, "training_losses", taken_over_at_step_3)
    with pytest.raises(FileExistsError, match=r"was taken over by othernode:4242 while this run .* held it"):
        train_run(tmp_path, "--max-steps", "4", "--ckpt-every", "2", "--sample-every", "0")
    checkpoints = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert checkpoints == ["step_0000002.pt"]  # step 4 was not written over the other job's
    assert (tmp_path / "run" / ".lock").read_text() == "othernode:4242"  # its name left for it: it goes on


def test_a_file_system_without_flock_runs_with_the_owner_checked_at_checkpoints(tmp_path, monkeypatch):
    """Lustre mounted with noflock, NFS without lockd: flock fails with ENOSYS or ENOLCK. The run starts (with a line
    in its log) instead of a traceback, and the owner written in .lock is still checked at every checkpoint."""
    def no_flock(*args):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    monkeypatch.setattr(fcntl, "flock", no_flock)
    train_run(tmp_path, "--max-steps", "2", "--ckpt-every", "2", "--sample-every", "0")
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "this file system gives no lock (Function not implemented" in log
    assert (tmp_path / "run" / "checkpoints" / "step_0000002.pt").exists()


def test_a_killed_writer_with_this_process_id_leaves_no_temporary_behind(tmp_path):
    """In a container the restarted process often gets the PID of the one that was killed mid-write: its temporary
    (≈ 11 GB for a DiT-XL/2 checkpoint) is a dead process's, not this one's (which has written nothing yet)."""
    (tmp_path / f"step_0050000.pt.tmp-{os.getpid()}").write_bytes(b"x" * 10)
    (tmp_path / "step_0050000.pt.tmp-1").write_bytes(b"x")  # PID 1 is alive: another writer, kept
    assert remove_stale_temporaries(str(tmp_path)) == {f"step_0050000.pt.tmp-{os.getpid()}": 10}
    assert os.listdir(tmp_path) == ["step_0050000.pt.tmp-1"]


def test_a_second_job_on_a_sample_folder_is_refused_and_overwrite_keeps_the_lock(checkpoint, tmp_path):  # noqa: F811
    """Two sample_ddp.py jobs on one folder (a duplicated array task): the second would sample every batch again
    and remove the first one's temporaries, or with --overwrite its batches. It is refused; a finished folder has no
    owner left, and --overwrite does not count the lock as a foreign file."""
    out = tmp_path / "s"
    sample_ddp.main(ddp_args(checkpoint, out))
    assert (out / ".lock").read_text() == ""  # released
    holder = RunLock(str(out)).acquire()
    try:
        with pytest.raises(FileExistsError, match="in use by another run"):
            sample_ddp.main(ddp_args(checkpoint, out, "--batch-size", "2", "--overwrite"))
        assert len(os.listdir(out / "batches")) == 3  # nothing of the running job removed
    finally:
        holder.release()
    sample_ddp.main(ddp_args(checkpoint, out, "--batch-size", "2", "--overwrite"))
    assert len(os.listdir(out / "batches")) == 4 and len(np.load(out / "samples.npz")["labels"]) == 7


def test_a_second_extraction_into_one_folder_is_refused(folder, vae_dir, tmp_path):  # noqa: F811
    """A second extraction job on a latent folder would remove the first one's temporaries and shards."""
    from extract_features import extract
    holder = RunLock(str(tmp_path / "latents")).acquire()
    try:
        with pytest.raises(FileExistsError, match="in use by another run"):
            extract(folder, str(tmp_path / "latents"), vae_dir, image_size=16, device="cpu")
    finally:
        holder.release()
    assert extract(folder, str(tmp_path / "latents"), vae_dir, image_size=16, device="cpu")["num_images"] == 6


def test_a_cut_off_safetensors_file_is_one_line_naming_it(tmp_path):
    """A copy of an exported model that did not finish: one line naming the file and what to do, not safetensors'
    own traceback (train.py --init-from, sample.py and sample_ddp.py --ckpt on every process)."""
    import json

    from safetensors.torch import save_file

    from fpdm.checkpoints import load_model
    from models import DiT
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    folder = tmp_path / "exported"
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.config))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 3])
    with pytest.raises(ValueError, match=r"model.safetensors cannot be read \(.*\): copy or export it again$"):
        load_model(str(folder))


def test_an_unwritable_scan_cache_keeps_the_scan_and_says_so(folder, monkeypatch, capsys):  # noqa: F811
    """A read-only or full home: the image scan (hours at ImageNet scale) is used, only not cached."""
    from fpdm.data import ImageFolderDataset
    monkeypatch.setenv("FPDM_CACHE", "/proc/fpdm-cache")
    assert len(ImageFolderDataset(folder, 16)) == 6 and "could not cache the image scan" in capsys.readouterr().err


def test_a_write_the_file_system_refuses_is_one_line(checkpoint, tmp_path):  # noqa: F811
    """A full disk, a quota, a file-size limit, a read-only or vanished folder while a script writes (every script
    ends an OSError through run_folders.exit_with_error; here sample_ddp.py under a real
    `ulimit -f` of 200 bytes: EFBIG on sample_ddp.py's first write beyond it, args.json): `error: [Errno 27] File too
    large: 'OUT/args.json'` in one line and exit 1, not a traceback; the folder continues once there is room."""
    import subprocess
    import sys

    from test_sampling import ROOT, ddp_cmd
    out = tmp_path / "full"
    code = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200)); sys.argv[0] = 'sample_ddp.py'; "
            "runpy.run_path('sample_ddp.py', run_name='__main__')")
    cmd = ddp_cmd(checkpoint, str(out), 1)
    proc = subprocess.run([sys.executable, "-c", code, *cmd[2:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: [Errno 27] File too large: '{out / 'args.json'}'"
    assert "Traceback" not in proc.stderr
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    sample_ddp.main(sample_ddp.parse_args(cmd[2:]))  # room again: the same command finishes the folder
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 10


HUNG_RANK = """
import datetime, sys, time
import torch.distributed as dist
from fpdm.run_folders import set_collective_timeout
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(hours=24))  # train.py's start: COLLECTIVE_TIMEOUT
set_collective_timeout(datetime.timedelta(seconds=2))  # its step loop: STEP_LOOP_TIMEOUT
start = time.time()
if rank == 1:
    time.sleep(8)  # a process that hangs (a stuck GPU, a hard-mounted file system)
try:
    dist.barrier()
    print("barrier passed")
except RuntimeError:
    print(f"timed out after {time.time() - start:.0f} s")
"""


def test_the_step_loops_collective_timeout_replaces_the_starts():
    """train.py starts its process group with a 24 h timeout (start-up waits: scans, reference statistics) and sets
    STEP_LOOP_TIMEOUT once its step loop begins (run_folders.set_collective_timeout): a collective then gives up on a
    process that hangs after that timeout, not after 24 h (here 2 s, gloo, two real processes)."""
    import subprocess
    import sys

    from test_train import ROOT, free_port
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", HUNG_RANK, str(rank), port], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for rank in (0, 1)]
    waiting = procs[0].communicate(timeout=120)[0].strip()
    procs[1].communicate(timeout=120)
    assert waiting in ("timed out after 2 s", "timed out after 3 s"), waiting
