"""The sampling command line shared by sample.py and sample_ddp.py (and its setup): the flags, FPDM's compute dials
from them, the diffusion to sample with, the settings that identify a sample folder and its default name, the VAE,
and one-line errors for scripts."""

import argparse
import os
import sys

import torch

from diffusion import TIMESTEP_SPACINGS
from fpdm import vae as vae_io
from fpdm.allocation import BudgetAllocator
from fpdm.checkpoints import diffusion_settings, load_model_for_sampling
from fpdm.sampling import CLIP_CHOICES, DIFFUSION_DEFAULTS, GUIDANCE_SCHEDULES, PRECISIONS, SAMPLERS, SCHEDULES, \
    FixedPointSolver, calibrate_step_weights, can_clip, clip_denoised_for, model_calls, \
    diffusion_for_sampling, file_fingerprint, is_pixel_model, iteration_schedule, iterations_from_block_budget, \
    resolve_device, settings_hash

DEFAULT_NUM_SAMPLES = 40  # sample.py without --num-samples or --class-labels (resolved there: see num_samples)


def build_parser(description=None):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint, an official DiT / FPDM-release .pt, a diffusers "
                   "DiTTransformer2DModel folder or an export.py safetensors folder (architecture read from it)")
    p.add_argument("--model", default=None, help="registry name, only to resolve what the weights cannot tell "
                   "(e.g. the head count of external checkpoints)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow argparse.Namespace objects in DiT training checkpoints (never arbitrary pickle)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddim",
                   help="sampling.SAMPLERS; ddim-parallel is also chosen by --parallel SOLVER")
    p.add_argument("--num-sampling-steps", type=int, default=50)
    p.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=TIMESTEP_SPACINGS[0],
                   help="which timesteps the sampler visits (diffusers' names): trailing (default) starts at T-1 with "
                   "equal steps; linspace is the FPDM release's; leading (starts at T - T/N) matches DiT/ADM's ddimN")
    p.add_argument("--noise-schedule", choices=["linear", "cosine"], default=None,
                   help="diffusion settings for checkpoints that record none (official DiT, bare state dicts); "
                   "default DiT's linear. A value that contradicts the checkpoint's is refused")
    p.add_argument("--predict-v", action=argparse.BooleanOptionalAction, default=None,
                   help="v-prediction (for checkpoints that record no diffusion settings; default epsilon)")
    p.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, default=None,
                   help="zero-terminal-SNR betas (as --predict-v)")
    p.add_argument("--diffusion-steps", type=int, default=None, help="training diffusion steps T (as --predict-v)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="guide only at timesteps t in [LOW, HIGH] (of T = 1000; Kynkäänniemi et al. 2024), one "
                   "branch elsewhere")
    p.add_argument("--guidance-schedule", choices=GUIDANCE_SCHEDULES, default="constant",
                   help="guidance scale constant, or linear from 1 at t = T to --cfg-scale at t = 0")
    p.add_argument("--guidance-channels", type=int, default=None,
                   help="guide only the first N channels (3 reproduces official DiT's numbers)")
    p.add_argument("--class-labels", type=str, default=None,
                   help="comma-separated labels. sample.py: one image per label (default: cycle the classes); "
                   "sample_ddp.py: sample i gets label i mod their count, so that any number of processes makes the "
                   "same samples (default: a random label drawn from (seed, i))")
    p.add_argument("--num-samples", type=int, default=None,
                   help=f"sample.py: images to make (default {DEFAULT_NUM_SAMPLES}; with --class-labels one per label)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip-denoised", choices=CLIP_CHOICES, default="auto",
                   help="clip predicted x0 to [-1, 1]: auto = only for pixel-space models (never for latents)")
    p.add_argument("--no-clip", dest="clip_denoised", action="store_const", const="off", help=argparse.SUPPRESS)
    # FPDM compute dials.
    p.add_argument("--iterations", type=int, default=None,
                   help="FPDM iterations per step (default: the model's depth - pre - post); the cap with --adaptive-tol")
    p.add_argument("--budget-block-evals", type=int, default=None,
                   help="FPDM: total transformer-block evaluations per image over all steps (pre + iterations + post)")
    p.add_argument("--schedule", choices=SCHEDULES, default="flat",
                   help="FPDM: how the iterations are spread over the steps (those of --budget-block-evals, else "
                   "--iterations x steps): flat, more-noisy (more at the first, noisiest steps), more-clean")
    p.add_argument("--fp-allocation", choices=["schedule", "budget", "calibrated"], default="schedule",
                   help="FPDM: spread the budget by --schedule, or 'budget': decide each step's iterations online "
                   "from the residuals (allocation.BudgetAllocator; spends the budget exactly, one sync per iteration), "
                   "or 'calibrated': the same with each step's residual weighted by its measured effect on the "
                   "samples (sampling.calibrate_step_weights, once before sampling on --calibration-samples noises)")
    p.add_argument("--calibration-samples", type=int, default=20,
                   help="--fp-allocation calibrated: images of the calibration batch (seeded by --seed + 1)")
    p.add_argument("--reuse", action="store_true", help="FPDM: start each step from the previous step's solution")
    p.add_argument("--fp-solver", choices=["iterate", "anderson"], default="iterate",
                   help="FPDM: how each step solves the layer: plain iteration, or Anderson mixing per image (each "
                   "evaluation is one iteration of the budget)")
    p.add_argument("--fp-history", type=int, default=5, help="FPDM Anderson: iterates kept (m)")
    p.add_argument("--fp-damping", type=float, default=1.0, help="FPDM Anderson: damping beta in (0, 1]")
    p.add_argument("--adaptive-tol", type=float, default=None,
                   help="FPDM: stop a step's iterations once the relative residual falls below this")
    # DEQ-DDIM: the whole DDIM chain as one fixed point (diffusion/parallel.py).
    p.add_argument("--parallel", choices=["anderson", "picard", "window", "two-axis"], default=None,
                   help="sample all DDIM steps in parallel with this solver (DDIM, clipping off, fixed FPDM iterations); "
                   "two-axis (FPDM): one fixed point over time and the layer of every step (fpdm/two_axis.py)")
    p.add_argument("--inner-iterations", type=int, default=None,
                   help="--parallel two-axis: layer iterations per timestep in each outer iteration (default 1), "
                   "warm-started from that timestep's previous solution")
    p.add_argument("--two-axis-outer", choices=["anderson", "picard"], default="anderson",
                   help="--parallel two-axis: the outer update of the chain")
    p.add_argument("--parallel-max-iter", type=int, default=15)
    p.add_argument("--parallel-tol", type=float, default=1e-3, help="relative residual tolerance (release: 1e-3)")
    p.add_argument("--parallel-window", type=int, default=None, help="sliding-window size (default: all steps)")
    p.add_argument("--parallel-chunk-size", type=int, default=None,
                   help="at most this many timesteps per network call (bounds memory)")
    p.add_argument("--compare-sequential", action="store_true",
                   help="with --parallel: also run sequential DDIM on the same noise and report both")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (regional: every step and iteration reuses the graphs)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16: the denoiser's calls under bf16 autocast (FPDM's fixed-point state stays float32; the "
                   "sampler's math and the VAE decode run outside it); recorded in args.json: a folder of its own")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TensorFloat-32 matmuls and convolutions on CUDA (as DiT's sample scripts; --no-tf32: full "
                   "fp32); no effect on CPU")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder (latent models only)")
    p.add_argument("--out", default=None, help="output folder (default: samples/<readable name>-<settings hash>)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an output folder that holds samples of other settings and start over")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def fpdm_iterations(args, model, calls=None):
    """Iteration counts per model call (or None for DiT) from the FPDM flags, over `calls` model calls (default: one
    per sampling step; Heun makes more); one-line errors for flags out of range or that contradict each other or the
    model."""
    calls = calls or args.num_sampling_steps
    if args.eta < 0:
        raise ValueError(f"--eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {args.eta}")
    if args.adaptive_tol is not None and not args.adaptive_tol > 0:
        raise ValueError(f"--adaptive-tol must be > 0, got {args.adaptive_tol}")
    if args.guidance_channels is not None and not 1 <= args.guidance_channels <= model.in_channels:
        raise ValueError(f"--guidance-channels must lie in [1, {model.in_channels}] for this "
                         f"{model.in_channels}-channel model, got {args.guidance_channels}")
    if args.cfg_scale != 1.0 and model.y_embedder.dropout_prob <= 0:
        raise ValueError("--cfg-scale needs a model trained with label dropout (class_dropout_prob > 0)")
    fpdm_flags = [f for f, v in (("--iterations", args.iterations), ("--budget-block-evals", args.budget_block_evals),
                                 ("--reuse", args.reuse or None), ("--adaptive-tol", args.adaptive_tol),
                                 ("--schedule", None if args.schedule == "flat" else args.schedule),
                                 ("--fp-allocation", None if args.fp_allocation == "schedule" else args.fp_allocation))
                  if v is not None]
    if not model.fixed_point:
        if fpdm_flags:
            raise ValueError(f"{fpdm_flags[0]} applies to FPDM checkpoints; this one is a DiT")
        return None
    if args.budget_block_evals is not None and args.iterations is not None:
        raise ValueError("give either --iterations or --budget-block-evals, not both")
    if args.fp_allocation in ("budget", "calibrated"):
        if args.budget_block_evals is None:
            raise ValueError(f"--fp-allocation {args.fp_allocation} spends a budget: give --budget-block-evals")
        if args.adaptive_tol is not None or args.schedule != "flat" or args.fp_solver != "iterate":
            raise ValueError(f"--fp-allocation {args.fp_allocation} decides every step's iterations itself: drop "
                             f"--adaptive-tol, --schedule and --fp-solver")
        if args.calibration_samples < 1:
            raise ValueError(f"--calibration-samples must be >= 1, got {args.calibration_samples}")
        fixed = sum(iterations_from_block_budget(model, args.budget_block_evals, calls))  # checks the budget
        return BudgetAllocator(fixed, calls)
    if args.budget_block_evals is not None:
        iterations = iterations_from_block_budget(model, args.budget_block_evals, calls, args.schedule)
    else:
        k = model.default_num_iterations if args.iterations is None else args.iterations
        if k < 1:
            raise ValueError(f"--iterations must be >= 1, got {k}")
        iterations = iteration_schedule(k * calls, calls, args.schedule)
    if args.schedule != "flat" and sum(iterations) == calls:  # the same images as flat, in a folder of their own
        raise ValueError(f"--schedule {args.schedule} moves iterations between steps, but one per step leaves none "
                         f"to move: raise --iterations or --budget-block-evals")
    return iterations


def class_labels(args, num_classes):
    """The --class-labels list (None when not given), each checked to lie in [0, num_classes)."""
    if not args.class_labels:
        return None
    try:
        labels = [int(v) for v in args.class_labels.split(",")]
    except ValueError:
        raise ValueError(f"--class-labels takes comma-separated integers, got {args.class_labels!r}") from None
    if any(not 0 <= v < num_classes for v in labels):
        raise ValueError(f"class labels must lie in [0, {num_classes - 1}]")
    return labels


def num_samples(args, labels):
    """sample.py's image count: one per --class-labels entry (`labels`), else --num-samples or its default; an
    explicit --num-samples that contradicts the labels is refused (None stands for "not given")."""
    if labels is None:
        return DEFAULT_NUM_SAMPLES if args.num_samples is None else args.num_samples
    if args.num_samples is not None and args.num_samples != len(labels):
        raise ValueError(f"--num-samples {args.num_samples} differs from the {len(labels)} --class-labels: sample.py "
                         f"makes one image per label (drop --num-samples, or give {args.num_samples} labels)")
    return len(labels)


def diffusion_config(args, model, train_config):
    """The diffusion to sample with: the checkpoint's recorded settings, else the --noise-schedule / --predict-v /
    --zero-terminal-snr / --diffusion-steps flags, else DiT's defaults (with a note). learn_sigma is the model's.
    A flag that contradicts a recorded setting is refused in one line."""
    carried = diffusion_settings(train_config) or {}
    given = {k: getattr(args, k) for k in ("noise_schedule", "predict_v", "zero_terminal_snr", "diffusion_steps")
             if getattr(args, k, None) is not None}
    conflicts = [k for k, v in given.items() if k in carried and carried[k] != v]
    if conflicts:
        listed = ", ".join(f"--{k.replace('_', '-')} {given[k]} (checkpoint: {carried[k]})" for k in conflicts)
        raise ValueError(f"{listed}: the checkpoint records how it was trained; drop the flag")
    if not carried and not given:
        print("note: the checkpoint records no diffusion settings: sampling with DiT's (linear schedule, epsilon-"
              "prediction, 1000 steps); pass --noise-schedule / --predict-v / --diffusion-steps if it was trained "
              "otherwise")
    return {**DIFFUSION_DEFAULTS, **carried, **given, "learn_sigma": model.learn_sigma}


def allocation_identity(args, iterations):
    """How the iterations are set, as recorded in a folder's identity: the schedule, or the allocator's settings
    (calibrated weights are not part of it, the calibration batch is: measured weights may differ in the last bits
    between devices, and the compute report records them)."""
    if not isinstance(iterations, BudgetAllocator):
        return iterations
    settings = {k: v for k, v in iterations.to_dict().items() if k != "weights"}
    if args.fp_allocation == "calibrated":
        settings["calibration"] = {"samples": args.calibration_samples, "seed": args.seed + 1}
    return settings


def effective_precision(args):
    """How the network computes, as a folder records it: "fp32" (CPU, or CUDA with --no-tf32), "tf32" (CUDA
    matmuls and convolutions in TensorFloat-32), "bf16" (autocast; on CUDA "bf16+tf32" unless --no-tf32: what stays
    float32, the VAE among it, runs in TF32). CPU runs ignore --tf32, so their folders keep their identity."""
    tf32 = args.tf32 and resolve_device(args.device).type == "cuda"
    if args.precision == "bf16":
        return "bf16+tf32" if tf32 else "bf16"
    return "tf32" if tf32 else "fp32"


def sample_settings(args, model, iterations, clip, labels, diffusion):
    """Every setting that changes the samples, as plain data: written first into the output folder as args.json,
    compared on every rerun, and hashed into the default folder name."""
    settings = {"checkpoint_sha256": file_fingerprint(args.ckpt), "checkpoint": os.path.abspath(args.ckpt),
                "diffusion": {k: diffusion[k] for k in sorted(DIFFUSION_DEFAULTS)},
                "model": args.model, "ema": not args.no_ema, "sampler": args.sampler,
                "num_sampling_steps": args.num_sampling_steps, "timestep_spacing": args.timestep_spacing,
                "eta": args.eta if args.sampler == "ddim" else None, "cfg_scale": args.cfg_scale,
                "guidance_channels": args.guidance_channels, "clip_denoised": clip, "seed": args.seed,
                "labels": labels, "precision": effective_precision(args),
                "vae_sha256": None if is_pixel_model(model) else file_fingerprint(args.vae),
                "fixed_point": {"iterations_per_step": allocation_identity(args, iterations), "reuse": args.reuse, "adaptive_tol": args.adaptive_tol,
                                "budget_block_evals": args.budget_block_evals, "schedule": args.schedule}
                if model.fixed_point else None}
    if model.fixed_point and args.fp_solver != "iterate":  # recorded when used (older folders keep their identity)
        settings["fixed_point"]["solver"] = {"method": args.fp_solver, "history": args.fp_history,
                                             "damping": args.fp_damping}
    # Recorded when used, so that folders written before these flags existed keep their identity.
    if args.guidance_interval is not None or args.guidance_schedule != "constant":
        settings["guidance"] = {"interval": args.guidance_interval, "schedule": args.guidance_schedule}
    sampler, options = resolve_sampler(args)
    if sampler == "ddim-parallel":
        settings["parallel"] = {"solver": options["solver"], "max_iter": options["solver_max_iter"],
                                "tol": options["solver_tol"], "window": options["window"]}
    if sampler == "ddim-two-axis":
        settings["parallel"] = {"solver": f"two-axis-{options['solver']}", "max_iter": options["solver_max_iter"],
                                "tol": options["solver_tol"], "inner_iterations": args.inner_iterations or 1}
    return settings


def output_folder(args, settings, suffix=""):
    """--out, or samples/<run>-<checkpoint>-<sampler and steps>-cfg-seed[-FPDM dials]<suffix>-<settings hash>."""
    if args.out:
        return args.out
    stem = os.path.splitext(os.path.basename(os.path.normpath(args.ckpt)))[0]
    run = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt))))
    parts = [run, stem, f"{args.sampler}{args.num_sampling_steps}", f"cfg{args.cfg_scale:g}", f"seed{args.seed}"]
    if args.budget_block_evals is not None:
        parts.append(f"budget{args.budget_block_evals}-"
                     f"{'adaptive' if args.fp_allocation == 'budget' else args.schedule}")
    elif args.iterations is not None:
        parts.append(f"it{args.iterations}")
    if args.reuse:
        parts.append("reuse")
    if args.adaptive_tol is not None:
        parts.append(f"tol{args.adaptive_tol:g}")
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


def clipping(args, model, sampler):
    """The resolved x̂_0 clipping; samplers that cannot clip (parallel DDIM solves the unclipped chain, Euler and
    Heun have no clipping in diffusers) turn "auto" off there, with a note."""
    clip = clip_denoised_for(model, args.clip_denoised)
    if clip and not can_clip(sampler):
        if args.clip_denoised == "on":
            raise ValueError(f"--sampler {sampler} cannot clip x0: drop --clip-denoised on")
        print(f"note: {sampler} samples without x0 clipping" + ("; a sequential comparison does the same"
                                                                if sampler in ("ddim-parallel", "ddim-two-axis") else ""))
        clip = False
    return clip


def resolve_sampler(args):
    """The registry name and its options from the flags (--parallel SOLVER selects ddim-parallel)."""
    if args.parallel and args.sampler not in ("ddim", "ddim-parallel"):
        raise ValueError("--parallel solves the DDIM chain: use --sampler ddim")
    if args.inner_iterations is not None and args.parallel != "two-axis":
        raise ValueError("--inner-iterations applies to --parallel two-axis")
    if args.parallel == "two-axis":
        return "ddim-two-axis", {"eta": args.eta, "solver": args.two_axis_outer,
                                 "solver_max_iter": args.parallel_max_iter, "solver_tol": args.parallel_tol,
                                 "chunk_size": args.parallel_chunk_size}
    if args.parallel or args.sampler == "ddim-parallel":
        return "ddim-parallel", {"eta": args.eta, "solver": args.parallel or "anderson",
                                 "solver_max_iter": args.parallel_max_iter, "solver_tol": args.parallel_tol,
                                 "window": args.parallel_window, "chunk_size": args.parallel_chunk_size}
    return args.sampler, ({"eta": args.eta} if args.sampler == "ddim" else {})


class Setup:
    """What sample.py and sample_ddp.py build from the flags: model, training config, FPDM iterations per step, the
    diffusion (settings and object), x0 clipping, VAE, and the sampler with its options."""

    def __init__(self, args, device):
        if device.type == "cuda":  # as train.py: both or neither (torch's default has cuDNN's TF32 on alone)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
        self.model, self.train_config = load_model_for_sampling(
            args.ckpt, use_ema=not args.no_ema, device=device, trust_checkpoint=args.trust_checkpoint,
            model_name=args.model)
        if args.compile:
            self.model.compile_regions()
        self.sampler, self.options = resolve_sampler(args)
        self.diffusion_config = diffusion_config(args, self.model, self.train_config)
        self.diffusion = diffusion_for_sampling(self.diffusion_config, args.num_sampling_steps, args.timestep_spacing)
        self.iterations = fpdm_iterations(args, self.model, model_calls(self.sampler, self.diffusion))
        if self.sampler == "ddim-parallel" and (args.reuse or args.adaptive_tol is not None or isinstance(
                self.iterations, BudgetAllocator) or (self.iterations and len(set(self.iterations)) > 1)):
            raise ValueError("--parallel evaluates all timesteps at once: it needs a fixed FPDM iteration count "
                             "(no --reuse, --adaptive-tol, non-flat --schedule or --fp-allocation budget)")
        if self.sampler == "ddim-two-axis":
            if not self.model.fixed_point:
                raise ValueError("--parallel two-axis solves FPDM's layer with the chain: this checkpoint is a DiT "
                                 "(use --parallel anderson)")
            if args.reuse or args.adaptive_tol is not None or args.iterations is not None or (
                    args.budget_block_evals is not None) or args.schedule != "flat":
                raise ValueError("--parallel two-axis sets the layer's iterations itself: use --inner-iterations "
                                 "(no --iterations, --budget-block-evals, --schedule, --reuse or --adaptive-tol)")
            if (args.inner_iterations or 1) < 1:
                raise ValueError(f"--inner-iterations must be >= 1, got {args.inner_iterations}")
            self.iterations = [args.inner_iterations or 1]
        self.clip = clipping(args, self.model, self.sampler)
        if args.fp_allocation == "calibrated" and self.model.fixed_point:
            self.iterations = self.calibrated(args, device)
        self.fp_solver = None
        if args.fp_solver != "iterate":
            if not self.model.fixed_point:
                raise ValueError("--fp-solver applies to FPDM checkpoints; this one is a DiT")
            self.fp_solver = FixedPointSolver(args.fp_solver, args.fp_history, damping=args.fp_damping)
        self.vae = load_vae(self.model, args.vae, device)

    def calibrated(self, args, device):
        """The budget allocator with step weights measured on a calibration batch of its own noise (seed + 1) and
        labels, from the flat split of the same budget, with the run's guidance, reuse and sampler."""
        model, budget = self.model, self.iterations
        g = torch.Generator().manual_seed(args.seed + 1)
        noise = torch.randn(args.calibration_samples, model.in_channels, *model.input_hw, generator=g).to(device)
        labels = torch.randint(model.num_classes, (args.calibration_samples,), generator=g).to(device)
        flat = iteration_schedule(budget.total_iterations, budget.num_steps, "flat")
        weights = calibrate_step_weights(
            model, self.diffusion, noise, labels, flat, reuse=args.reuse, cfg_scale=args.cfg_scale,
            sampler=self.sampler, progress=True, clip_denoised=self.clip, guidance_channels=args.guidance_channels,
            guidance_interval=args.guidance_interval, guidance_schedule=args.guidance_schedule,
            precision=args.precision, **self.options)
        return BudgetAllocator(budget.total_iterations, budget.num_steps, weights=weights)

    def sample(self, args, noise, labels, sampler=None, progress=False):
        """sampling.sample_images with every flag applied; `sampler` overrides the chosen one (options then its own)."""
        from fpdm.sampling import sample_images
        name = sampler or self.sampler
        options = self.options if sampler is None else ({"eta": args.eta} if sampler == "ddim" else {})
        iterations = self.iterations
        if name in ("ddim-parallel", "ddim-two-axis") and iterations:
            iterations = iterations[0]  # one count for all timesteps (checked above)
        return sample_images(self.model, self.diffusion, noise, labels, sampler=name, cfg_scale=args.cfg_scale,
                             iterations_per_step=iterations, reuse=args.reuse, tol=args.adaptive_tol,
                             clip_denoised=self.clip, progress=progress, guidance_channels=args.guidance_channels,
                             guidance_interval=args.guidance_interval, guidance_schedule=args.guidance_schedule,
                             fp_solver=self.fp_solver, precision=args.precision, **options)


def run_script(main, parse_args):
    """main(parse_args()) with the expected failures (bad flags, files, folders) as one line on stderr, exit 1."""
    try:
        return main(parse_args())
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
