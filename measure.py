"""Shared by bench/ and experiments/: bytes autograd saves for backward, peak RSS, and random-weight models."""

import resource

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
