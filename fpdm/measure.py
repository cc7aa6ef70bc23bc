"""Shared by bench/ and experiments/: bytes autograd saves for backward, peak RSS, and random-weight models."""

import os
import resource
import sys

import torch


def perturb_parameters_(model, scale=0.02):
    """Add `scale`·N(0, 1) (torch's global RNG) to every parameter, in place, and return the model. adaLN-Zero makes a
    freshly initialised DiT output 0; perturbed, every op does real work, as in a trained model."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def saved_tensor_bytes(fn):
    """Run `fn()` and return the bytes of the distinct tensor storages autograd saved for backward while it ran.
    Exact and repeatable on any device (unlike RSS), and the quantity that activation memory is made of."""
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        key = (tensor.untyped_storage().data_ptr(), tensor.device, tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return total


def peak_rss_bytes():
    """Peak resident set of this process image (VmHWM; ru_maxrss would carry a parent's peak across exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss():
    """Set VmHWM back to the current RSS (Linux >= 4.0), so that a later peak excludes transients before this."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the baseline is then the earlier peak: the growth is underestimated, never overestimated


SYNC_OPS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class SyncCounter:
    """Counts the operations that make the host wait for the device (reading a tensor's value: .item(), .tolist(),
    .cpu(), .numpy(), bool/float/int of a tensor; torch.from_numpy, the start of a host-to-device copy) when called
    directly from this repository's code, by (operation, "file:function"), while a `counting` wrapper runs. torch's
    own internals are not counted. Use as a context manager: the patches are undone on exit."""

    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: scripts and fpdm/
    SKIP = (os.sep + ".venv" + os.sep, os.sep + "tests" + os.sep, os.sep + "bench" + os.sep)

    def __init__(self):
        self.active, self.calls, self._saved = 0, {}, []

    def _ours(self, frame):
        path = os.path.abspath(frame.f_code.co_filename)
        return path.startswith(self.ROOT) and not any(part in path for part in self.SKIP)

    def _wrap(self, name, original):
        def wrapper(*args, **kwargs):
            if self.active:
                caller = sys._getframe(1)
                if self._ours(caller):
                    key = (name, f"{os.path.basename(caller.f_code.co_filename)}:{caller.f_code.co_name}")
                    self.calls[key] = self.calls.get(key, 0) + 1
            return original(*args, **kwargs)
        return wrapper

    def __enter__(self):
        targets = [(torch.Tensor, name) for name in SYNC_OPS] + [(torch, "from_numpy")]
        for owner, name in targets:
            self._saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, self._wrap(name, getattr(owner, name)))
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved = []

    def watch(self, owner, *names):
        """Count while `owner.<name>` runs, for each name (e.g. watch(train, "train_step")); undone on exit."""
        for name in names:
            self._saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, self.counting(getattr(owner, name)))

    def counting(self, fn):
        """fn, with counting on while it runs."""
        def wrapper(*args, **kwargs):
            self.active += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.active -= 1
        return wrapper

    @property
    def total(self):
        return sum(self.calls.values())
