"""The sampling command line's setup, shared by sample.py and sample_ddp.py: from a typed configuration
(fpdm/sample_config.py) the checks that every flag given is used or refused, FPDM's compute dials, the diffusion to
sample with, the settings that identify a sample folder and its default name, the VAE, and one-line errors."""

import json
import os

import torch

from fpdm import vae as vae_io
from fpdm.allocation import BudgetAllocator
from fpdm.checkpoints import diffusion_settings, latest_checkpoint, load_model_for_sampling
from fpdm.graphs import GraphedCalls, fixed_work_conflict
from fpdm.run_folders import atomic_write, exit_with_error, from_main_process
from fpdm.sample_config import DEFAULT_NUM_SAMPLES, FIELDS, identity
from fpdm.sampling import CALIBRATION_FILE, DIFFUSION_DEFAULTS, FixedPointSolver, calibrate_step_weights, \
    capabilities, clip_denoised_for, diffusion_for_sampling, file_fingerprint, is_pixel_model, iteration_schedule, \
    iterations_from_block_budget, model_calls, resolve_device, settings_hash

SETTINGS_FORMAT = 2  # args.json's layout: 2 = generated from sample_config's fields (earlier folders: no "format")
# --parallel two-axis --compare-sequential: the reference, sequential DDIM whose layer is solved to this relative
# residual at every step (with reuse), at most this many iterations a step
REFERENCE_LAYER_TOL, REFERENCE_LAYER_ITERATIONS = 1e-5, 100


def flag(name):
    return "--" + name.replace("_", "-")


def refuse_given(cfg, names, why):
    """One line for the first of the settings `names` that was given (differs from its default): `why` it has no
    effect here. A setting only --preset gave is dropped instead, with a note (`--preset dit-fid50k --cfg-scale 1`:
    unguided, without the preset's guidance channels)."""
    for name in names:
        if cfg.given(name) and name in cfg.from_preset:
            cfg.drop_preset_setting(name)
        elif cfg.given(name):
            raise ValueError(f"{flag(name)} {why}")


def resolve_sampler(cfg):
    """The registry name and its options from the flags (--parallel SOLVER selects ddim-parallel or ddim-two-axis).
    Flags of the parallel group that the chosen sampler does not use are refused."""
    name, chosen = cfg.sampler.sampler, cfg.parallel_sampler()
    if chosen is not None:
        if name not in ("ddim", chosen):
            raise ValueError(f"--parallel {cfg.parallel.parallel} solves the DDIM chain: use --sampler ddim")
        name = chosen
    caps = capabilities(name)
    p = cfg.parallel
    if not caps.parallel:
        if p is not None:
            refuse_given(cfg, ["inner_iterations", "two_axis_outer"], "applies to --parallel two-axis")
            refuse_given(cfg, ["parallel_window"], "applies to --parallel window")
            refuse_given(cfg, ["parallel_max_iter", "parallel_tol", "parallel_chunk_size", "parallel_sync_every",
                               "compare_sequential"],
                         "applies to parallel sampling (--parallel SOLVER)")
        return name, ({"eta": cfg.sampler.eta} if caps.takes_eta else {})
    if p is None:
        raise ValueError(f"--sampler {name} solves all steps at once: sample it with sample.py")
    if caps.sets_layer_iterations:
        refuse_given(cfg, ["parallel_window"], "applies to --parallel window")
        return name, {"eta": cfg.sampler.eta, "solver": p.two_axis_outer, "solver_max_iter": p.parallel_max_iter,
                      "solver_tol": p.parallel_tol, "chunk_size": p.parallel_chunk_size,
                      "sync_every": p.parallel_sync_every}
    solver = p.parallel or "anderson"
    refuse_given(cfg, ["inner_iterations", "two_axis_outer"], "applies to --parallel two-axis")
    if solver == "window":
        refuse_given(cfg, ["parallel_max_iter", "parallel_tol"], "applies to --parallel anderson, picard and "
                     "two-axis (the window solver advances by its own error test)")
    else:
        refuse_given(cfg, ["parallel_window"], "applies to --parallel window")
    return name, {"eta": cfg.sampler.eta, "solver": solver, "solver_max_iter": p.parallel_max_iter,
                  "solver_tol": p.parallel_tol, "window": p.parallel_window, "chunk_size": p.parallel_chunk_size,
                  "sync_every": p.parallel_sync_every}


# The most network rows (states x images, doubled by guidance) one call of a parallel sampler evaluates without
# --parallel-chunk-size: about 10 GB of activations at DiT-XL/2. Without a bound, sample.py's default 40 guided images
# over T' = 50 steps were one call of 4,000 rows, beyond an H100's memory.
PARALLEL_ROWS_PER_CALL = 1024


def parallel_chunk_size(images, guided):
    """--parallel-chunk-size's default: as many timesteps per call as keep it within PARALLEL_ROWS_PER_CALL rows (all
    T' states of one image in one call)."""
    return max(1, PARALLEL_ROWS_PER_CALL // (images * (2 if guided else 1)))


def check_cuda_graphs(cfg, caps):
    """--cuda-graphs needs a CUDA device and calls whose work is fixed in advance (GuidedModel replays them)."""
    if resolve_device(cfg.output.device).type != "cuda":
        raise ValueError("--cuda-graphs replays CUDA graphs, and this run is on the CPU (where sampling is eager "
                         "anyway): drop it, or sample with --device cuda")
    if caps.parallel:
        raise ValueError("--cuda-graphs applies to sequential samplers: the parallel solvers change their batch as "
                         "images converge")
    fp = cfg.fp
    conflict = fixed_work_conflict(adaptive_tol=fp.adaptive_tol is not None,
                                   fp_allocation=fp.fp_allocation in ("budget", "calibrated"),
                                   fp_solver=fp.fp_solver == "anderson")
    if conflict:
        name = conflict[0]
        raise ValueError(f"--cuda-graphs replays calls whose work is fixed in advance; {flag(name)} "
                         f"{getattr(fp, name)} decides it at each step: drop one")


def check_settings(cfg, model, sampler):
    """Every setting in range and used: one line for the first flag that is out of range, contradicts another, or
    has no effect with this model and sampler (sampler: the resolved name)."""
    s, g, fp, caps = cfg.sampler, cfg.guidance, cfg.fp, capabilities(sampler)
    for name, value in (("num_sampling_steps", s.num_sampling_steps),
                        ("num_samples", cfg.grid.num_samples if cfg.grid else None),
                        ("num_fid_samples", cfg.fid.num_fid_samples if cfg.fid else None),
                        ("batch_size", cfg.fid.batch_size if cfg.fid else None)):
        if value is not None and value < 1:
            raise ValueError(f"{flag(name)} must be >= 1, got {value}")
    if s.eta < 0:
        raise ValueError(f"--eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {s.eta}")
    if cfg.output.cuda_graphs:
        check_cuda_graphs(cfg, caps)
    if not caps.takes_eta:
        refuse_given(cfg, ["eta"], f"applies to DDIM samplers; --sampler {sampler} takes none")
    if fp.adaptive_tol is not None and not fp.adaptive_tol > 0:
        raise ValueError(f"--adaptive-tol must be > 0, got {fp.adaptive_tol}")
    if g.cfg_scale == 1.0:
        refuse_given(cfg, ["guidance_interval", "guidance_schedule", "guidance_channels"],
                     "shapes classifier-free guidance: give --cfg-scale other than 1")
    if g.guidance_channels is not None and not 1 <= g.guidance_channels <= model.in_channels:
        raise ValueError(f"--guidance-channels must lie in [1, {model.in_channels}] for this "
                         f"{model.in_channels}-channel model, got {g.guidance_channels}")
    if g.cfg_scale != 1.0 and model.y_embedder.dropout_prob <= 0:
        raise ValueError("--cfg-scale needs a model trained with label dropout (class_dropout_prob > 0)")
    if caps.parallel:  # which branches run is decided per call, and a parallel call holds every timestep
        refuse_given(cfg, ["guidance_interval"], "needs one timestep per model call: sample sequentially (a guidance "
                     "schedule works with --parallel)")
    if is_pixel_model(model):
        refuse_given(cfg, ["vae"], "decodes latents; this model samples pixels")
    if not model.fixed_point:
        refuse_given(cfg, [f for f, (group, _) in FIELDS.items() if group == "fp"], "applies to FPDM checkpoints; "
                     "this one is a DiT")
        if caps.needs_fpdm:
            raise ValueError(f"--sampler {sampler} solves FPDM's layer with the chain: this checkpoint is a DiT "
                             f"(use --parallel anderson)")
        return
    if fp.fp_solver != "anderson":
        refuse_given(cfg, ["fp_history", "fp_damping"], "applies to --fp-solver anderson")
    if fp.fp_allocation != "calibrated":
        refuse_given(cfg, ["calibration_samples"], "applies to --fp-allocation calibrated")
    if caps.parallel:
        if caps.sets_layer_iterations:
            refuse_given(cfg, ["iterations", "budget_block_evals", "schedule", "reuse", "adaptive_tol",
                               "fp_allocation", "fp_solver"],
                         "does not apply to --parallel two-axis: it sets the layer's iterations itself (use "
                         "--inner-iterations)")
            if (cfg.parallel.inner_iterations or 1) < 1:
                raise ValueError(f"--inner-iterations must be >= 1, got {cfg.parallel.inner_iterations}")
        else:
            refuse_given(cfg, ["reuse", "adaptive_tol", "schedule", "fp_allocation", "budget_block_evals"],
                         "does not apply to --parallel: it evaluates all timesteps at once with one FPDM iteration "
                         "count, as many times as the solver iterates (give --iterations)")
    if fp.budget_block_evals is not None and fp.iterations is not None:
        if "budget_block_evals" not in cfg.from_preset:
            raise ValueError("give either --iterations or --budget-block-evals, not both")
        cfg.drop_preset_setting("budget_block_evals")  # --iterations replaces the preset's budget
    if fp.fp_allocation in ("budget", "calibrated"):
        if fp.budget_block_evals is None:
            raise ValueError(f"--fp-allocation {fp.fp_allocation} spends a budget: give --budget-block-evals")
        refuse_given(cfg, ["adaptive_tol", "schedule", "fp_solver"], f"does not apply to --fp-allocation "
                     f"{fp.fp_allocation}: it decides every step's iterations itself")
        if fp.calibration_samples < 1:
            raise ValueError(f"--calibration-samples must be >= 1, got {fp.calibration_samples}")


def fpdm_iterations(cfg, model, calls):
    """Iteration counts per model call (or None for DiT, or a BudgetAllocator) from the FPDM flags, over `calls`
    model calls (Heun makes more than one per step)."""
    fp = cfg.fp
    if not model.fixed_point:
        return None
    if fp.fp_allocation in ("budget", "calibrated"):
        fixed = sum(iterations_from_block_budget(model, fp.budget_block_evals, calls))  # checks the budget
        return BudgetAllocator(fixed, calls)
    if fp.budget_block_evals is not None:
        iterations = iterations_from_block_budget(model, fp.budget_block_evals, calls, fp.schedule)
    else:
        k = model.default_num_iterations if fp.iterations is None else fp.iterations
        if k < 1:
            raise ValueError(f"--iterations must be >= 1, got {k}")
        iterations = iteration_schedule(k * calls, calls, fp.schedule)
    if fp.schedule != "flat" and sum(iterations) == calls:  # the same images as flat, in a folder of their own
        raise ValueError(f"--schedule {fp.schedule} moves iterations between steps, but one per step leaves none "
                         f"to move: raise --iterations or --budget-block-evals")
    return iterations


def fp_budget_hint(iterations):
    return (f"the budget splits into {min(iterations)} to {max(iterations)} iterations per step; give --iterations, "
            f"or a --budget-block-evals that divides evenly")


def class_labels(cfg, num_classes):
    """The --class-labels list (None when not given), each checked to lie in [0, num_classes)."""
    text = cfg.output.class_labels
    if not text:
        return None
    try:
        labels = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--class-labels takes comma-separated integers, got {text!r}") from None
    if any(not 0 <= v < num_classes for v in labels):
        raise ValueError(f"class labels must lie in [0, {num_classes - 1}]")
    return labels


def num_samples(cfg, labels):
    """sample.py's image count: one per --class-labels entry (`labels`), else --num-samples or its default; an
    explicit --num-samples that contradicts the labels is refused (None stands for "not given")."""
    given = cfg.grid.num_samples
    if labels is None:
        return DEFAULT_NUM_SAMPLES if given is None else given
    if given is not None and given != len(labels):
        raise ValueError(f"--num-samples {given} differs from the {len(labels)} --class-labels: sample.py "
                         f"makes one image per label (drop --num-samples, or give {given} labels)")
    return len(labels)


def diffusion_config(cfg, model, train_config):
    """The diffusion to sample with: the checkpoint's recorded settings, else the --noise-schedule / --predict-v /
    --zero-terminal-snr / --diffusion-steps flags, else DiT's defaults (with a note). learn_sigma is the model's.
    A flag that contradicts a recorded setting is refused in one line."""
    carried = diffusion_settings(train_config) or {}
    given = {k: v for k, v in vars(cfg.diffusion).items() if v is not None}
    conflicts = [k for k, v in given.items() if k in carried and carried[k] != v]
    if conflicts:
        listed = ", ".join(f"{flag(k)} {given[k]} (checkpoint: {carried[k]})" for k in conflicts)
        raise ValueError(f"{listed}: the checkpoint records how it was trained; drop the flag")
    if not carried and not given:
        print("note: the checkpoint records no diffusion settings: sampling with DiT's (linear schedule, epsilon-"
              "prediction, 1000 steps); pass --noise-schedule / --predict-v / --diffusion-steps if it was trained "
              "otherwise")
    return {**DIFFUSION_DEFAULTS, **carried, **given, "learn_sigma": model.learn_sigma}


def allocation_identity(cfg, iterations):
    """How the iterations are set, as recorded in a folder's identity: the schedule, or the allocator's settings
    (calibrated weights are not part of it, the calibration batch is: measured weights may differ in the last bits
    between devices, and the compute report records them)."""
    if not isinstance(iterations, BudgetAllocator):
        return iterations
    settings = {k: v for k, v in iterations.to_dict().items() if k != "weights"}
    if cfg.fp.fp_allocation == "calibrated":
        settings["calibration"] = {"samples": cfg.fp.calibration_samples, "seed": cfg.sampler.seed + 1}
    return settings


def effective_precision(cfg):
    """How the network computes, as a folder records it: "fp32" (CPU, or CUDA with --no-tf32), "tf32" (CUDA
    matmuls and convolutions in TensorFloat-32), "bf16" (autocast; on CUDA "bf16+tf32" unless --no-tf32: what stays
    float32, the VAE among it, runs in TF32). CPU runs ignore --tf32, so their folders keep their identity."""
    tf32 = cfg.output.tf32 and resolve_device(cfg.output.device).type == "cuda"
    if cfg.output.precision == "bf16":
        return "bf16+tf32" if tf32 else "bf16"
    return "tf32" if tf32 else "fp32"


def sample_settings(cfg, setup, labels):
    """Every setting that changes the samples, as plain data: written first into the output folder as args.json,
    compared on every rerun, and hashed into the default folder name. Generated from the configuration's fields
    (sample_config.identity: all but NOT_IN_IDENTITY), plus what those resolve to (the checkpoint and VAE by
    content, the diffusion, clipping, labels, precision and FPDM iterations)."""
    model, caps = setup.model, capabilities(setup.sampler)
    vae = cfg.output.vae
    resolved = {"sampler": setup.sampler, "diffusion": {k: setup.diffusion_config[k] for k in sorted(DIFFUSION_DEFAULTS)},
                "clip_denoised": setup.clip, "labels": labels, "precision": effective_precision(cfg),
                "iterations_per_step": allocation_identity(cfg, setup.iterations)}
    return {"format": SETTINGS_FORMAT,
            "checkpoint_file": {"path": os.path.abspath(cfg.checkpoint.ckpt),
                                "sha256": file_fingerprint(cfg.checkpoint.ckpt)},
            "vae_sha256": None if vae is None else file_fingerprint(vae),
            "resolved": resolved, **identity(cfg, {"fp": model.fixed_point, "parallel": caps.parallel})}


def output_folder(cfg, settings, suffix=""):
    """--out, or samples/<run>-<checkpoint>-<sampler and steps>-cfg-seed[-FPDM dials]<suffix>-<settings hash>."""
    if cfg.output.out:
        return cfg.output.out
    ckpt, fp = cfg.checkpoint.ckpt, cfg.fp
    stem = os.path.splitext(os.path.basename(os.path.normpath(ckpt)))[0]
    run = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))))
    parts = [run, stem, f"{settings['resolved']['sampler']}{cfg.sampler.num_sampling_steps}",
             f"cfg{cfg.guidance.cfg_scale:g}", f"seed{cfg.sampler.seed}"]
    if fp.budget_block_evals is not None:
        parts.append(f"budget{fp.budget_block_evals}-{'adaptive' if fp.fp_allocation == 'budget' else fp.schedule}")
    elif fp.iterations is not None:
        parts.append(f"it{fp.iterations}")
    if fp.reuse:
        parts.append("reuse")
    if fp.adaptive_tol is not None:
        parts.append(f"tol{fp.adaptive_tol:g}")
    return os.path.join("samples", "-".join(p for p in parts if p) + suffix + "-" + settings_hash(settings))


def load_vae(model, vae_path, device):
    """The AutoencoderKL that decodes this model's latents (loaded once per process), or None for pixel models."""
    if is_pixel_model(model):
        return None
    if vae_path is None:
        raise ValueError(f"this model samples {model.in_channels}-channel latents: pass --vae with a local diffusers "
                         f"AutoencoderKL folder (e.g. a download of stabilityai/sd-vae-ft-ema)")
    return vae_io.load(vae_path).to(device).eval()


def decode(images, vae):
    """Pixels in [-1, 1]: latents decode with `vae` (from load_vae), pixel samples (vae None) pass through."""
    return images if vae is None else vae_io.decode(images, vae)


def clipping(cfg, model, sampler):
    """The resolved x̂_0 clipping; samplers that cannot clip (parallel DDIM solves the unclipped chain, Euler and
    Heun have no clipping in diffusers) turn "auto" off there, with a note."""
    choice = cfg.sampler.clip_denoised
    clip = clip_denoised_for(model, choice)
    caps = capabilities(sampler)
    if clip and not caps.can_clip:
        if choice == "on":
            raise ValueError(f"--sampler {sampler} cannot clip x0: drop --clip-denoised on")
        print(f"note: {sampler} samples without x0 clipping" + ("; a sequential comparison does the same"
                                                                if caps.parallel else ""))
        clip = False
    return clip


def resolve_checkpoint(path):
    """--ckpt as the file to read: a train.py run folder's latest checkpoint (with a note), read once (the file's
    content is a sample folder's identity, not the run's); any other path as it is."""
    ckpt = latest_checkpoint(path)
    if ckpt != path:
        print(f"note: {path} is a run folder: sampling its latest checkpoint {ckpt}")
    return ckpt


class Setup:
    """What sample.py and sample_ddp.py build from the configuration: model, training config, FPDM iterations per
    step, the diffusion (settings and object), x0 clipping, VAE, and the sampler with its options."""

    def __init__(self, cfg, device):
        out = cfg.output
        if device.type == "cuda":  # as train.py: both or neither (torch's default has cuDNN's TF32 on alone)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = out.tf32
        cfg.checkpoint.ckpt = resolve_checkpoint(cfg.checkpoint.ckpt)  # a file from here on
        self.model, self.train_config = load_model_for_sampling(
            cfg.checkpoint.ckpt, use_ema=cfg.checkpoint.ema, device=device,
            trust_checkpoint=cfg.checkpoint.trust_checkpoint, model_name=cfg.checkpoint.model)
        if out.precision == "bf16":  # every network call runs under bf16 autocast: its weight casts made once
            self.model.cast_matmul_weights(torch.bfloat16)
        if out.compile:
            self.model.compile_regions()
        self.sampler, self.options = resolve_sampler(cfg)
        check_settings(cfg, self.model, self.sampler)
        self.diffusion_config = diffusion_config(cfg, self.model, self.train_config)
        self.diffusion = diffusion_for_sampling(self.diffusion_config, cfg.sampler.num_sampling_steps,
                                                cfg.sampler.timestep_spacing)
        caps = capabilities(self.sampler)
        if caps.sets_layer_iterations:
            self.iterations = [cfg.parallel.inner_iterations or 1]
        else:
            self.iterations = fpdm_iterations(cfg, self.model, model_calls(self.sampler, self.diffusion))
            if caps.parallel and self.iterations and len(set(self.iterations)) > 1:
                raise ValueError(f"--parallel evaluates all timesteps at once with one FPDM iteration count: "
                                 f"{fp_budget_hint(self.iterations)}")
        self.clip = clipping(cfg, self.model, self.sampler)
        # --fp-allocation calibrated: the step weights are measured by `calibrate`, once the output folder is claimed
        self.needs_calibration = cfg.fp.fp_allocation == "calibrated" and self.model.fixed_point
        self.fp_solver = None
        if self.model.fixed_point and cfg.fp.fp_solver != "iterate":
            self.fp_solver = FixedPointSolver(cfg.fp.fp_solver, cfg.fp.fp_history, damping=cfg.fp.fp_damping)
        self.vae = load_vae(self.model, out.vae, device)
        self.graphs = GraphedCalls() if out.cuda_graphs else None  # one set for all batches (same shapes)

    def guidance(self, cfg):
        g = cfg.guidance
        return dict(cfg_scale=g.cfg_scale, guidance_channels=g.guidance_channels,
                    guidance_interval=g.guidance_interval, guidance_schedule=g.guidance_schedule,
                    precision=cfg.output.precision)

    def calibrate(self, cfg, device, folder, state=None):
        """--fp-allocation calibrated: the budget allocator takes step weights measured on a calibration batch, or
        those `folder` (a claimed output folder) recorded in CALIBRATION_FILE when an earlier run of its settings
        measured them (a rerun, a resume: the same split of the budget, not a second measurement). With `state`
        (accelerate's) the main process measures or reads them and every process gets its weights. No-op for other
        allocations."""
        if not self.needs_calibration:
            return
        path = os.path.join(folder, CALIBRATION_FILE)

        def weights():
            if os.path.exists(path):
                with open(path) as f:
                    return json.load(f)["weights"]
            measured = self.step_weights(cfg, device)
            atomic_write(path, lambda f: json.dump({"weights": measured}, f))
            return measured
        measured = weights() if state is None else from_main_process(state, weights)
        budget = self.iterations
        self.iterations = BudgetAllocator(budget.total_iterations, budget.num_steps, weights=measured)
        self.needs_calibration = False

    def step_weights(self, cfg, device):
        """Step weights measured on a calibration batch of its own noise (seed + 1) and labels, from the flat split
        of the budget, with the run's guidance, reuse and sampler."""
        model, budget, n = self.model, self.iterations, cfg.fp.calibration_samples
        g = torch.Generator().manual_seed(cfg.sampler.seed + 1)
        noise = torch.randn(n, model.in_channels, *model.input_hw, generator=g).to(device)
        labels = torch.randint(model.num_classes, (n,), generator=g).to(device)
        flat = iteration_schedule(budget.total_iterations, budget.num_steps, "flat")
        return calibrate_step_weights(model, self.diffusion, noise, labels, flat, reuse=cfg.fp.reuse,
                                      sampler=self.sampler, progress=True, clip_denoised=self.clip,
                                      **self.guidance(cfg), **self.options)

    def sample(self, cfg, noise, labels, sampler=None, progress=False):
        """sampling.sample_images with every setting applied; `sampler` overrides the chosen one (options then its
        own: eta for DDIM)."""
        from fpdm.sampling import sample_images
        name = sampler or self.sampler
        options = self.options if sampler is None else (
            {"eta": cfg.sampler.eta} if capabilities(sampler).takes_eta else {})
        if self.needs_calibration:
            raise RuntimeError("--fp-allocation calibrated: call Setup.calibrate (once the output folder is claimed) "
                               "before sampling")
        iterations, reuse, tol = self.iterations, cfg.fp.reuse, cfg.fp.adaptive_tol
        if capabilities(name).parallel and options.get("chunk_size") is None:
            options = {**options, "chunk_size": parallel_chunk_size(len(noise), cfg.guidance.cfg_scale != 1.0)}
        if capabilities(name).parallel and iterations:
            iterations = iterations[0]  # one count for all timesteps (checked in check_settings)
        elif sampler is not None and capabilities(self.sampler).sets_layer_iterations:
            # the sequential reference of two-axis sampling is its fixed point: DDIM with a converged layer
            iterations = [REFERENCE_LAYER_ITERATIONS] * self.diffusion.num_timesteps
            reuse, tol = True, REFERENCE_LAYER_TOL
        return sample_images(self.model, self.diffusion, noise, labels, sampler=name, iterations_per_step=iterations,
                             reuse=reuse, tol=tol, clip_denoised=self.clip, progress=progress,
                             fp_solver=self.fp_solver, graphs=self.graphs if sampler is None else None,
                             **self.guidance(cfg), **options)


def run_script(main, parse_args):
    """main(parse_args()) with the expected failures (bad flags, files, folders) as one line on stderr, exit 1."""
    try:
        return main(parse_args())
    except (ValueError, OSError) as e:  # OSError: also a full disk, a quota, a read-only or vanished folder
        exit_with_error(e)
