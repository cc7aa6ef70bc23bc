"""Trackers: chosen by what really imports, a missing one asked for by name stops in one line, wandb (offline) and
tensorboard write under the run folder, and sample grids, evaluation and diagnostics plots reach them as images."""

import glob
import os

import pytest

import train
from fpdm import training
from test_train import TINY_ARGS



def test_a_stray_folder_or_a_broken_module_is_no_tracker(tmp_path, monkeypatch):
    (tmp_path / "stray_tracker").mkdir()  # what a `wandb/` folder beside the script looks like to find_spec
    (tmp_path / "broken_tracker.py").write_text("raise ImportError('half installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not training._importable("stray_tracker") and not training._importable("broken_tracker")
    assert training._importable("tensorboard")
    monkeypatch.setattr(training, "_importable", lambda name: name == "tensorboard")
    assert training.choose_tracker("auto") == "tensorboard"
    with pytest.raises(ValueError, match="--tracker wandb: the wandb package does not import here.*--tracker none"):
        training.choose_tracker("wandb")
    monkeypatch.setattr(training, "_importable", lambda name: False)
    assert training.choose_tracker("auto") is None


def tracker_run(tmp_path, tracker):
    args = [a for a in TINY_ARGS]
    args[args.index("--tracker") + 1] = tracker
    cfg = train.parse_args([*args, "--results-dir", str(tmp_path), "--run-name", f"with-{tracker}", "--max-steps", "2",
                            "--ckpt-every", "2", "--log-every", "1", "--fp-diagnostics-every", "2", "--eval-every",
                            "2", "--eval-samples", "6", "--eval-steps", "2", "--num-sample-images", "4"])
    return train.main(cfg)


def test_wandb_writes_offline_under_the_run_folder_with_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder
    run_dir = tracker_run(tmp_path / "runs", "wandb")
    assert not os.path.exists(tmp_path / "wandb")
    runs = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    assert len(runs) == 1 and runs[0].endswith(training.wandb_run_id(run_dir))
    media = {os.path.basename(p).split("_")[0] for p in glob.glob(os.path.join(runs[0], "files", "media", "images",
                                                                              "*.png"))}
    assert {"samples", "eval", "fp"} <= media, media


def test_tensorboard_gets_scalars_and_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = tracker_run(tmp_path, "tensorboard")
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"loss", "eval/fid_mnist"} <= set(events.Tags()["scalars"])
    assert {"samples", "eval", "fp_contraction", "fp_residual_by_t"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("samples")] == [2]
