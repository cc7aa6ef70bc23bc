"""experiments/common.py: an experiment reuses the rows of its results JSON only when flags, code and checkpoints are
the ones that made them (a rerun of an interrupted script continues; one after a change measures every row again)."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_common():
    spec = importlib.util.spec_from_file_location("experiments_common", os.path.join(ROOT, "experiments", "common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_are_reused_only_with_the_same_flags_code_and_checkpoints(tmp_path, monkeypatch, capsys):
    common = load_common()
    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")
    args, key = {"steps": 10}, ("method",)
    ident = common.identity(str(ckpt))
    assert ident == common.identity(str(ckpt)) and len(ident["code"]) == 16 and len(ident["checkpoints"]) == 1
    rows = [{"method": "sequential", "fid": 57.5}]
    common.write_json("exp", {"args": args, "identity": ident, "rows": rows})
    assert common.finished_rows("exp", args, key, ident) == {("sequential",): rows[0]}  # an interrupted run goes on
    assert common.finished_rows("exp", {"steps": 20}, key, ident) == {}  # other flags
    ckpt.write_bytes(b"retrained")  # the same path, other weights
    assert common.finished_rows("exp", args, key, common.identity(str(ckpt))) == {}
    assert "made by other code or checkpoints" in capsys.readouterr().out
    other_code = {**ident, "code": "0" * 16}
    assert common.finished_rows("exp", args, key, other_code) == {}
    with open(tmp_path / "exp.json", "w") as f:  # a report from before identities were recorded
        json.dump({"args": args, "rows": rows}, f)
    assert common.finished_rows("exp", args, key, ident) == {}
