"""sample_ddp.py, run as a file, that records what each process reads to settle the folder's identity: every call of
`cli.latest_checkpoint` (a run folder's latest.json) and `cli.file_fingerprint` (a checkpoint's sha256) appends
["latest" or "hash", path] as one JSON line to RECORD_LOG.<rank>.

    RECORD_LOG=/tmp/reads accelerate launch ... tests/recording_sample_ddp.py <sample_ddp.py flags>
"""

import json
import os
import runpy


def recording(name, real, path):
    """`real` that first appends [name, its first argument] to `path`."""
    def call(first, *args, **kwargs):
        with open(path, "a") as f:
            f.write(json.dumps([name, str(first)]) + "\n")
        return real(first, *args, **kwargs)
    return call


def read_calls(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(json.loads(line)) for line in f]


if __name__ == "__main__":
    from fpdm import cli
    log = f"{os.environ['RECORD_LOG']}.{os.environ.get('RANK', '0')}"
    cli.latest_checkpoint = recording("latest", cli.latest_checkpoint, log)
    cli.file_fingerprint = recording("hash", cli.file_fingerprint, log)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runpy.run_path(os.path.join(root, "sample_ddp.py"), run_name="__main__")  # with these flags (sys.argv[1:])
