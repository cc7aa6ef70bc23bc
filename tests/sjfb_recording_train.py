"""train.py, run as a file, that records the S-JFB counts its FPDM runs: each process appends (n, m) of every training
call to SJFB_LOG.<rank> (one JSON list per line).

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


def read_draws(path):
    with open(path) as f:
        return [tuple(json.loads(line)) for line in f]


if __name__ == "__main__":
    from fpdm.training import TRAIN_SCRIPT
    from models import FPDM
    FPDM.solve = recording_solve(FPDM.solve, f"{os.environ['SJFB_LOG']}.{os.environ.get('RANK', '0')}")
    runpy.run_path(TRAIN_SCRIPT, run_name="__main__")  # train.py with these flags (sys.argv[1:])
