"""Network calls replayed from CUDA graphs: sequential sampling without per-kernel launch overhead.

At batch 1-4 a DiT step is a few hundred small kernels whose launches, not their arithmetic, set the time. A CUDA
graph records one call's kernels once and launches them all at once afterwards (`torch.cuda.CUDAGraph`): the inputs
are copied into the buffers the graph reads, the graph is replayed, and its outputs (buffers that the next replay
overwrites) are cloned. One graph per distinct call: input shapes and dtypes, plus whatever the call fixes as
Python values (guidance scale, branch, FPDM iteration count, whether a reused solution comes in).

    calls = GraphedCalls()                                   # CUDA; GraphedCalls(EmulatedGraphs()) anywhere
    (out,), meta = calls(lambda x, t, y: ((net(x, t, y),), None), key="dit", tensors=(x, t, y))

`sampling.GuidedModel(graphs=...)` routes its network calls through this (sample.py --cuda-graphs). On the CPU
there is nothing to capture: sampling is eager, and `EmulatedGraphs` reproduces a graph's buffer semantics (fixed
input and output buffers, outputs overwritten by each replay) and a capture's two rules that code can break on the
CPU too (no host sync inside, no autocast weight cache around it), so that tests check the plumbing without a GPU.
"""

import torch

WARMUP_CALLS = 3  # eager calls on a side stream before capture (cuBLAS/cuDNN workspaces, lazy initialisation)


# What decides an FPDM call's work while it runs, so that no graph can replay it: (setting, how a library caller
# names it). GuidedModel and sample.py's --cuda-graphs (cli.check_cuda_graphs) both refuse through fixed_work_conflict.
ONLINE_DECISIONS = (("adaptive_tol", "an adaptive tolerance"), ("fp_allocation", "an online budget allocation"),
                    ("fp_solver", "Anderson in the layer"))


def fixed_work_conflict(adaptive_tol, fp_allocation, fp_solver):
    """The first of ONLINE_DECISIONS that is on (each argument: whether that setting decides work online), or None."""
    on = {"adaptive_tol": adaptive_tol, "fp_allocation": fp_allocation, "fp_solver": fp_solver}
    return next(((name, words) for name, words in ONLINE_DECISIONS if on[name]), None)


def check_capturable(device_type):
    """Refuse a capture under autocast with its weight cache on (as torch.cuda.make_graphed_callables does): the
    casts made by the warm-up calls are cached outside the graph, the captured kernels read them, and the cache frees
    them when the outermost autocast exits, so later replays would read freed memory. Use
    torch.autocast(..., cache_enabled=False) around graphed calls (GuidedModel does)."""
    if torch.is_autocast_enabled(device_type) and torch.is_autocast_cache_enabled():
        raise RuntimeError("a CUDA graph captured under autocast with cache_enabled=True would read cast weights "
                           "that autocast frees on exit: enter torch.autocast(..., cache_enabled=False)")


class CudaGraphs:
    """Capture with torch.cuda.CUDAGraph: warm-up calls on a side stream, then one captured call; all graphs share
    one memory pool (they never run concurrently, and GraphedCalls clones every output before the next replay)."""

    def __init__(self):
        self.pool = None

    def capture(self, run):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_CALLS):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs, meta = run()
        return outputs, meta, graph.replay


class EmulatedGraphs:
    """A graph's semantics on any device, for tests: the captured call's outputs are fixed buffers that every replay
    overwrites in place, computed from the fixed input buffers; and, as CUDA refuses it during a capture, a host
    sync (a tensor's value read by this repository's code: measure.SyncCounter) in the captured call raises."""

    def capture(self, run):
        from fpdm.measure import SyncCounter
        with SyncCounter() as counter:
            outputs, meta = counter.counting(run)()
        if counter.total:
            raise RuntimeError(f"host syncs during a graph capture (CUDA refuses them): {sorted(counter.calls)}")

        def replay():
            for buffer, value in zip(outputs, run()[0]):
                buffer.copy_(value)
        return outputs, meta, replay


class GraphedCalls:
    """fn(*tensors) -> (tuple of tensors, meta), replayed from a graph per (key, shapes, dtypes, devices) captured
    at its first call; returns (cloned outputs, the meta recorded at capture). `captures` counts the graphs."""

    def __init__(self, backend=None):
        self.backend = backend if backend is not None else CudaGraphs()
        self.graphs = {}

    @property
    def captures(self):
        return len(self.graphs)

    def __call__(self, fn, key, tensors):
        full_key = (key, tuple((tuple(t.shape), t.dtype, t.device) for t in tensors))
        entry = self.graphs.get(full_key)
        if entry is None:
            check_capturable(tensors[0].device.type)
            inputs = tuple(t.clone() for t in tensors)
            outputs, meta, replay = self.backend.capture(lambda: fn(*inputs))
            entry = self.graphs[full_key] = (inputs, outputs, meta, replay)
        inputs, outputs, meta, replay = entry
        for buffer, value in zip(inputs, tensors):
            buffer.copy_(value)
        replay()
        return tuple(o.clone() for o in outputs), meta
