"""What a resume meets on a cluster, each a one-line error that names the remedy: a text or truncated file as
--resume, a latest.json naming a missing checkpoint, a torn newest checkpoint under --resume auto (the good one
beside it is named), weights of another size (the sizes they fit are named)."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest


from conftest import reset_accelerate
from test_train import run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4 (copied per test)."""
    folder = tmp_path_factory.mktemp("runs")
    run(folder, "--max-steps", "4", "--ckpt-every", "2", "--keep-last", "3", "--sample-every", "0", name="base")
    reset_accelerate()
    return folder / "base"


@pytest.fixture
def run_copy(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    return tmp_path / "run"


def resume(run_dir, *flags):
    try:
        return run(run_dir.parent, "--max-steps", "6", "--ckpt-every", "2", "--sample-every", "0", *flags,
                   name=run_dir.name)
    finally:
        reset_accelerate()


def test_a_text_or_truncated_file_as_resume_says_what_to_pass(run_copy, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes((run_copy / "checkpoints" / "step_0000004.pt").read_bytes()[:2000])
    for path in (text, truncated):
        with pytest.raises(ValueError, match=r"cannot read .* as a train.py checkpoint \(truncated, or not one.*\); "
                                             r"pass a checkpoints/step_\*\.pt of a train.py run$") as error:
            resume(run_copy, "--resume", str(path))
        assert "\n" not in str(error.value) and "_use_new_zipfile_serialization" not in str(error.value)


def test_latest_json_naming_a_missing_checkpoint_names_the_one_to_resume_from(run_copy):
    os.remove(run_copy / "checkpoints" / "step_0000004.pt")
    good = run_copy / "checkpoints" / "step_0000002.pt"
    with pytest.raises(FileNotFoundError, match=rf"names .*step_0000004.pt, which is missing; the newest readable "
                                                 rf"checkpoint is {good}: pass --resume {good} to continue from it"):
        resume(run_copy, "--resume", "auto")
    assert resume(run_copy, "--resume", str(good))  # the remedy works: the run continues from step 2


def test_a_torn_newest_checkpoint_names_the_good_one_beside_it(run_copy):
    newest = run_copy / "checkpoints" / "step_0000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    good = run_copy / "checkpoints" / "step_0000002.pt"
    with pytest.raises(ValueError, match=rf"cannot read {newest} .*; the newest readable checkpoint is {good}: "
                                         rf"pass --resume {good}") as error:
        resume(run_copy, "--resume", "auto")
    assert "\n" not in str(error.value)
    assert json.loads((run_copy / "latest.json").read_text())["step"] == 4  # nothing was rewritten
    good.unlink()
    with pytest.raises(ValueError, match="no other readable checkpoint in .*: start the run over under another"):
        resume(run_copy, "--resume", "auto")


def test_weights_of_another_size_name_what_they_fit():
    from models import DiT, load_state_dict_checked
    wide = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=1, num_heads=6)
    narrow = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"the weights have hidden size 384 and patch size 2: build the model with "
                                         r"--model DiT-S/2"):
        load_state_dict_checked(narrow, wide.state_dict())
    odd = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="--hidden-size 48 --patch-size 2"):
        load_state_dict_checked(narrow, odd.state_dict())



def test_disk_full_while_checkpointing_says_what_survived(run_copy, monkeypatch):
    """ENOSPC in the middle of writing step 6's checkpoint: one line (disk full, which file, what survived, --resume
    auto), the partial file removed, latest.json still on step 4, and the resume continues from there."""
    import errno

    from fpdm import checkpoints
    real_save = checkpoints.torch.save

    def full_disk(obj, f, *args, **kwargs):
        if obj.get("step") == 6:
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    with pytest.raises(OSError, match=rf"cannot write {run_copy}/checkpoints/step_0000006.pt \(disk full\); "
                                      rf"{run_copy}/checkpoints/step_0000004.pt and latest.json are intact .*rerun "
                                      rf"with --resume auto") as error:
        resume(run_copy, "--resume", "auto")
    assert "\n" not in str(error.value)
    assert sorted(os.listdir(run_copy / "checkpoints")) == ["step_0000002.pt", "step_0000004.pt"]
    assert json.loads((run_copy / "latest.json").read_text())["step"] == 4
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    resume(run_copy, "--resume", "auto")
    assert json.loads((run_copy / "latest.json").read_text())["step"] == 6


def test_checkpoint_failure_line_when_latest_json_cannot_be_read(tmp_path):
    """The failure line is still one line when latest.json is damaged or unreadable (a stale handle on shared
    storage): it says so instead of raising from inside the error report."""
    import errno

    from fpdm.training import checkpoint_write_failure
    full = OSError(errno.ENOSPC, "No space left on device")
    assert "no earlier checkpoint exists" in checkpoint_write_failure(str(tmp_path), "step_0000002.pt", full)
    (tmp_path / "latest.json").write_text('{"path": "checkpoints/step_0000002.pt"')  # cut short
    line = checkpoint_write_failure(str(tmp_path), "step_0000004.pt", full)
    assert re.search(r"\(disk full\); latest.json could not be read \(JSONDecodeError: .*\), so what it names is "
                     r"unchecked .*--resume auto", line), line
    (tmp_path / "latest.json").unlink()
    (tmp_path / "latest.json").mkdir()  # open() fails with an OSError other than "not found"
    assert "latest.json could not be read (IsADirectoryError" in checkpoint_write_failure(str(tmp_path), "x.pt", full)
    assert "\n" not in line


def test_a_write_the_file_system_refuses_inside_torch_save_is_one_line(run_copy):
    """A real refusal while torch.save writes tensor data (a file-size limit, `ulimit -f`: EFBIG, as a full disk
    gives ENOSPC; train.py in a subprocess): one line naming the reason and what survived, not torch's "RuntimeError:
    [enforce fail at inline_container.cc] unexpected pos" traceback; the partial file removed."""
    import re
    import subprocess
    import sys

    from test_train import ROOT, TINY_ARGS
    limit = (run_copy / "checkpoints" / "step_0000004.pt").stat().st_size // 2
    code = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); sys.argv[0] = 'train.py'; "
            "runpy.run_path('train.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, *TINY_ARGS, "--results-dir", str(run_copy.parent), "--run-name",
                           run_copy.name, "--max-steps", "6", "--ckpt-every", "2", "--sample-every", "0", "--resume",
                           "auto"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert re.search(r"error: cannot write \S*step_0000006.pt \(file too large for the file system or `ulimit -f`\); "
                     r"\S*step_0000004.pt and latest.json are intact", proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "inline_container" not in proc.stderr
    assert sorted(os.listdir(run_copy / "checkpoints")) == ["step_0000002.pt", "step_0000004.pt"]


def test_results_dir_that_is_a_file_or_unwritable_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match=r"--results-dir .*afile is a file: choose a folder"):
        run(tmp_path / "afile", "--max-steps", "1")
    with pytest.raises(ValueError, match=r"--results-dir /sys/fpdm-test cannot be written \(Permission denied\): "
                                         r"choose a folder you can write to"):
        run(Path("/sys/fpdm-test"), "--max-steps", "1")  # /sys refuses new folders, even to root


def test_indivisible_batch_under_a_launch_is_refused_before_the_process_group_in_one_line(tmp_path):
    """Under `accelerate launch` the check runs before the process group starts; the line is printed once and is the
    root cause in the launcher's failure summary (not "To enable traceback see ...")."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    from test_train import free_port
    proc = subprocess.run([accelerate, "launch", "--config_file", "aconfs/cpu_2proc.yaml", "--main_process_port",
                           str(free_port()), "train.py", "--data-path",
                           "mnist", "--global-batch-size", "7", "--results-dir", str(tmp_path), "--tracker", "none"],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    line = ("error: --global-batch-size 7 is not divisible by processes (2) x --grad-accum-steps (1): use a multiple "
            "of 2")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and output.count("\n" + line) + output.startswith(line) == 1, output[-3000:]
    assert f"traceback : {line}" in output.split("Root Cause")[-1]
    assert not os.listdir(tmp_path)  # nothing created
