"""Network calls replayed from CUDA graphs (fpdm/graphs.py, GuidedModel(graphs=...), sample.py --cuda-graphs).

There is no GPU here: `EmulatedGraphs` gives a graph's buffer semantics on the CPU (fixed input buffers the replay
reads, fixed output buffers every replay overwrites) and refuses what a capture refuses (host syncs, autocast's
weight cache), so these tests check everything but the capture itself: the samples equal eager sampling's for every
kind of call GuidedModel makes, and one graph is captured per distinct call.
"""

import pytest
import torch

from fpdm import cli, sample_config
from fpdm.graphs import EmulatedGraphs, GraphedCalls
from fpdm.sampling import BudgetAllocator, FixedPointSolver, GuidedModel, diffusion_for_sampling, sample_images
from models import DiT


def tiny(fixed_point):
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=5, num_heads=4, num_classes=10,
                learn_sigma=True, fixed_point=fixed_point, class_dropout_prob=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def batch(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([1, 5, 9][:n])


CASES = {
    "dit-ddim": (False, {}),
    "dit-guided-interval": (False, {"cfg_scale": 2.0, "guidance_interval": (300.0, 700.0)}),
    "dit-ddpm": (False, {"sampler": "ddpm", "cfg_scale": 1.5}),
    "dit-dpmpp": (False, {"sampler": "dpmpp-2m", "cfg_scale": 1.5}),
    "fpdm-reuse-schedule": (True, {"iterations_per_step": [3, 1, 2, 2, 1, 1], "reuse": True, "cfg_scale": 2.0,
                                   "residual_history": True}),
    "fpdm-interval-reuse": (True, {"iterations_per_step": 2, "reuse": True, "cfg_scale": 2.0,
                                   "guidance_interval": (0.0, 500.0)}),
    "dit-linear-schedule": (False, {"cfg_scale": 3.0, "guidance_schedule": "linear"}),
    "dit-ddpm-bf16": (False, {"sampler": "ddpm", "cfg_scale": 1.5, "precision": "bf16"}),
    "fpdm-reuse-bf16": (True, {"iterations_per_step": 2, "reuse": True, "cfg_scale": 2.0, "precision": "bf16"}),
}


@pytest.mark.parametrize("case", CASES)
def test_graph_replayed_calls_give_eager_samples_and_reports(case):
    fixed_point, options = CASES[case]
    model = tiny(fixed_point)
    diffusion = diffusion_for_sampling({"learn_sigma": True}, 6)
    noise, labels = batch()
    runs = {}
    for mode in ("eager", "graphs"):
        graphs = GraphedCalls(EmulatedGraphs()) if mode == "graphs" else None
        torch.manual_seed(3)  # DDPM's draws
        samples, fn = sample_images(model, diffusion, noise, labels, graphs=graphs, **options)
        runs[mode] = samples, fn.compute(), fn.residuals, graphs
    assert torch.equal(runs["graphs"][0], runs["eager"][0])
    assert runs["graphs"][1] == runs["eager"][1]  # iterations, block evaluations, FLOPs, final residuals
    assert runs["graphs"][2] == runs["eager"][2]  # the residuals recorded (every iteration's: residual_history)
    graphs = runs["graphs"][3]
    distinct = {"dit-ddim": 1, "dit-guided-interval": 2, "dit-ddpm": 1, "dit-dpmpp": 1,
                "fpdm-reuse-schedule": 3,  # k = 3 without a solution coming in, then k = 1 and k = 2 with one
                "fpdm-interval-reuse": 3,  # unguided without and with a solution, guided with one
                "dit-linear-schedule": 1,  # the scale changes at every step: a graph input
                "dit-ddpm-bf16": 1, "fpdm-reuse-bf16": 2}[case]
    assert graphs.captures == distinct


def test_one_graph_set_for_models_recording_the_last_or_every_residual():
    """sample.py keeps one set of graphs for all batches: a GuidedModel recording every iteration's residual gets its
    own graphs, not the replay of one captured recording only the last."""
    model = tiny(True)
    diffusion = diffusion_for_sampling({"learn_sigma": True}, 4)
    noise, labels = batch()
    graphs = GraphedCalls(EmulatedGraphs())
    lengths = {}
    for history in (False, True):
        _, fn = sample_images(model, diffusion, noise, labels, iterations_per_step=3, graphs=graphs,
                              residual_history=history)
        lengths[history] = [len(r) for r in fn.residuals]
    assert lengths == {False: [1] * 4, True: [3] * 4} and graphs.captures == 2


def test_graphed_calls_copy_inputs_in_and_clone_outputs_out():
    calls = GraphedCalls(EmulatedGraphs())
    double = lambda x: ((2 * x,), "meta")
    a, b = torch.ones(3), torch.full((3,), 5.0)
    (out_a,), meta = calls(double, "k", (a,))
    (out_b,), _ = calls(double, "k", (b,))  # the same graph, new inputs: replay reads them
    assert meta == "meta" and calls.captures == 1
    assert torch.equal(out_a, torch.full((3,), 2.0)) and torch.equal(out_b, torch.full((3,), 10.0))
    calls(double, "k", (torch.zeros(4),))  # another shape: another graph
    calls(double, "other", (a,))  # another key: another graph
    assert calls.captures == 3


def test_graphs_refuse_calls_decided_online():
    model = tiny(True)
    graphs = GraphedCalls(EmulatedGraphs())
    for options, words in (({"tol": 0.1}, "an adaptive tolerance"),
                           ({"iterations_per_step": BudgetAllocator(12, 6)}, "an online budget allocation"),
                           ({"fp_solver": FixedPointSolver("anderson")}, "Anderson in the layer")):
        with pytest.raises(ValueError, match=f"CUDA graphs .* not with {words}"):
            GuidedModel(model, graphs=graphs, **options)


def test_a_capture_refuses_host_syncs_and_autocasts_weight_cache():
    """The two rules of a real capture that code can break on the CPU too, kept by the emulation: no host sync in
    the captured call (CUDA refuses it), and no autocast weight cache around it (torch.cuda.make_graphed_callables
    refuses it: the warm-up's cast weights, read by the graph, are freed when autocast exits). sample_images with
    --precision bf16 captures without the cache (the bf16 cases above), and a caller's own autocast is refused."""
    from diffusion.solvers import relative_residual  # reads the residual's value: a host sync
    calls = GraphedCalls(EmulatedGraphs())
    with pytest.raises(RuntimeError, match="host syncs during a graph capture.*item"):
        calls(lambda x: ((x * relative_residual(2 * x, x),), None), "sync", (torch.ones(3),))
    (out,), _ = calls(lambda x: ((2 * x,), None), "no sync", (torch.ones(3),))
    assert torch.equal(out, torch.full((3,), 2.0))
    model = tiny(False)
    diffusion = diffusion_for_sampling({"learn_sigma": True}, 3)
    noise, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="cache_enabled=False"):
        sample_images(model, diffusion, noise, labels, graphs=GraphedCalls(EmulatedGraphs()))
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        sample_images(model, diffusion, noise, labels, graphs=GraphedCalls(EmulatedGraphs()))


def test_cuda_graphs_flag_refusals(monkeypatch):
    """On the CPU the flag is refused (sampling there is eager); on CUDA, with a parallel sampler and with every
    setting that decides a call's work online."""
    make = lambda **kw: sample_config.make("sample", ckpt="x.pt", cuda_graphs=True, **kw)
    caps = cli.capabilities("ddim")
    with pytest.raises(ValueError, match="on the CPU"):
        cli.check_cuda_graphs(make(device="cpu"), caps)
    monkeypatch.setattr(cli, "resolve_device", lambda name: torch.device("cuda"))
    cli.check_cuda_graphs(make(), caps)  # sequential DDIM, fixed work: fine
    with pytest.raises(ValueError, match="sequential samplers"):
        cli.check_cuda_graphs(make(parallel="anderson"), cli.capabilities("ddim-parallel"))
    cli.check_cuda_graphs(make(guidance_schedule="linear"), caps)  # the scale is a graph input
    for setting in ({"adaptive_tol": 0.1}, {"fp_allocation": "budget"}, {"fp_solver": "anderson"}):
        with pytest.raises(ValueError, match=f"--{next(iter(setting)).replace('_', '-')}"):
            cli.check_cuda_graphs(make(**setting), caps)
