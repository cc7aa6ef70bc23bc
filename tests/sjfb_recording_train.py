"""train.py, run as a file, that records the S-JFB counts its FPDM runs: each process appends (n, m) of every training
call to SJFB_LOG.<rank> (one JSON list per line), and the sum of its EMA's weights after every update to
SJFB_LOG.ema.<rank>.

    SJFB_LOG=/tmp/draws accelerate launch ... tests/sjfb_recording_train.py <train.py flags>
"""

import json
import os
import runpy


def recording_solve(real, path):
    """FPDM.solve that appends (n, m) of every training-mode call to `path` (one JSON list per line)."""
    def solve(self, *args, **kwargs):
        z = real(self, *args, **kwargs)
        if self.training:
            with open(path, "a") as f:
                f.write(json.dumps(list(self.last_stats.sjfb)) + "\n")
        return z
    return solve


def recording_update_ema(real, path):
    """training.update_ema that appends the sum of the EMA's weights (float64) after each update to `path`."""
    def update_ema(ema, model, decay):
        real(ema, model, decay)
        with open(path, "a") as f:
            f.write(json.dumps(sum(p.double().sum().item() for p in ema.parameters())) + "\n")
    return update_ema


def read_draws(path):
    with open(path) as f:
        return [tuple(json.loads(line)) for line in f]


if __name__ == "__main__":
    from fpdm import training
    from models import FPDM
    log, rank = os.environ["SJFB_LOG"], os.environ.get("RANK", "0")
    FPDM.solve = recording_solve(FPDM.solve, f"{log}.{rank}")
    training.update_ema = recording_update_ema(training.update_ema, f"{log}.ema.{rank}")
    runpy.run_path(training.TRAIN_SCRIPT, run_name="__main__")  # train.py with these flags (sys.argv[1:])
