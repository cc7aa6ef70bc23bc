"""Shared by bench/, experiments/, train.py and tests: bytes autograd saves for backward, peak RSS, random-weight
models, GPUs' peak FLOP/s, and the waits for the device: this repository's reads (SyncCounter) and those inside
torch's ops (device_waits)."""

import os
import re
import resource
import sys

import torch


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s by a part of the device name; the longest part that matches
# wins, so "NVIDIA H200 NVL" is an NVL card, not an SXM H200. torch names the H100 SXM "NVIDIA H100 80GB HBM3".
# MFU's denominator (bench/gpu.py, train.py's log).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H200 NVL": 835.5, "H100": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.5,
                    "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0}


def peak_key(device_name):
    """The PEAK_BF16_TFLOPS entry of a device name (the longest that matches), or None."""
    matches = [key for key in PEAK_BF16_TFLOPS if key.lower() in device_name.lower()]
    return max(matches, key=len) if matches else None


def peak_tflops(device_name):
    """The dense bf16 peak of a device name, or None for a device not in the table."""
    key = peak_key(device_name)
    return PEAK_BF16_TFLOPS[key] if key else None


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


# The aten ops that make the host wait for the device from inside torch, where SyncCounter (which sees this
# repository's Python calls) cannot: a scalar read (an index given as a 0-d tensor, a tensor's value in a size or a
# condition) and the ops whose output size depends on values (boolean-mask indexing, nonzero, masked_select, unique).
DEVICE_WAIT_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
                   "aten::unique_dim", "aten::unique_consecutive")
# Ops whose CPU kernel reads values on the host but whose CUDA kernel does not: torch.linalg.solve_ex "synchronizes
# only when check_errors=True" on a CUDA device (its documentation; its LAPACK path on the CPU reads its pivots), and
# torch._assert_async, which on a CUDA device asserts in a kernel (on the CPU it reads the condition).
CPU_ONLY_WAITS = ("aten::_linalg_solve_ex", "aten::_assert_async")


def device_waits(fn, frames=True):
    """Run fn() under torch.profiler (CPU activity) and return {(op, where): count} for every DEVICE_WAIT_OPS op that
    ran, at any depth, except inside CPU_ONLY_WAITS ops. `where` is the nearest enclosing aten op or record_function
    (e.g. "aten::index" for a boolean mask), else, with `frames` (Python frames recorded: slow, for short runs), the
    nearest frame of this repository's code as "file:function" (SyncCounter's key: an explicit .item(), or an index
    given as a 0-d tensor, which Python reads before any op runs), else "top". With SyncCounter (this repository's
    own reads: .tolist() on the CPU is not an op) it counts every wait for the device that a GPU run of the same code
    would have, and more: on the CPU every tensor is on the host, so reads of tensors that a GPU run keeps on the host
    too (diffusers' schedulers keep their timesteps and sigmas there) count here but make no GPU wait."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_stack=frames) as prof:
        fn()
    waits = {}
    for event in prof.events():
        if event.name not in DEVICE_WAIT_OPS:
            continue
        parents, parent = [], event.cpu_parent
        while parent is not None:
            parents.append(parent.name)
            parent = parent.cpu_parent
        if any(name in CPU_ONLY_WAITS for name in parents):
            continue
        where = next(filter(None, map(_where, parents)), "top")
        waits[(event.name, where)] = waits.get((event.name, where), 0) + 1
    return waits


_PYTHON_FRAME = re.compile(r"^(.*)\((\d+)\): (.*)$")  # a profiler event of a Python call: "path(LINE): function"


def _where(name):
    """device_waits' name for an enclosing profiler event, or None to look further out: an aten op or record_function
    as it is, a Python frame of this repository's code (SyncCounter.ROOT, not its SKIP folders, not this module) as
    "file:function"; other frames, built-in methods and the read itself are passed over."""
    frame = _PYTHON_FRAME.match(name)
    if frame is None:
        return None if name.startswith("<built-in") or name in DEVICE_WAIT_OPS + ("aten::item",) else name
    path, function = frame.group(1), frame.group(3)  # the path relative to the sys.path entry it came from
    full = next((os.path.abspath(os.path.join(entry or os.getcwd(), path)) for entry in sys.path
                 if os.path.isfile(os.path.join(entry or os.getcwd(), path))), path)
    if (not full.startswith(SyncCounter.ROOT) or any(part in full for part in SyncCounter.SKIP)
            or full == os.path.abspath(__file__)):  # device_waits' own call of fn()
        return None
    return f"{os.path.basename(path)}:{function}"
