"""train.py, run as a file, whose process of rank OOM_RANK runs out of device memory in its OOM_CALL-th sampling call
of FID during training (fpdm.sampling.sample_images raises torch.OutOfMemoryError there).

    OOM_RANK=1 OOM_CALL=1 accelerate launch ... tests/oom_eval_train.py <train.py flags>
"""

import os
import runpy

if __name__ == "__main__":
    import torch

    import fpdm.sampling
    from fpdm import training
    real, calls = fpdm.sampling.sample_images, []

    def sample_images(*args, **kwargs):
        calls.append(1)
        if os.environ.get("RANK", "0") == os.environ["OOM_RANK"] and len(calls) == int(os.environ["OOM_CALL"]):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)
    fpdm.sampling.sample_images = sample_images
    runpy.run_path(training.TRAIN_SCRIPT, run_name="__main__")  # train.py with these flags (sys.argv[1:])
