"""Fixed Point Diffusion Models: the library that the scripts at the top of the repository (train.py, sample.py,
sample_ddp.py, evaluate.py, extract_features.py, export.py, invert.py, demo.py) share. The networks are models.py
and the diffusion math is diffusion/; neither imports from here.

    config          the training configuration: typed groups, flags, presets, resume rules
    training        what train.py calls: run folder, resume, checkpoints, data order, metrics, previews, FID
    checkpoints     every checkpoint format in (load_model), training checkpoints and RNG state out
    diffusers_dit   our DiT <-> diffusers: key mapping, scheduler config
    sampling        the sampler registry, GuidedModel, budgets and schedules, FixedPointSolver, sample folders
    allocation      BudgetAllocator: a budget of fixed-point iterations spent online over the sampling steps
    two_axis        two-axis sampling: one fixed point over the DDIM chain and FPDM's layer together
    cli             the sampling command line of sample.py and sample_ddp.py
    metrics         FID, sFID, IS, precision/recall, KID; references; FID-MNIST (evaluate.py is its CLI)
    diagnostics     fixed-point diagnostics during training (contraction, residual by timestep)
    data            datasets (bundled MNIST, image folders, latent shards) and image listing
    vae             the diffusers VAE: load, encode, decode
    run_folders     atomic writes, the run-folder lock, checkpoint pruning, metrics truncation
    measure         memory and host-device sync measurement
    graphs          network calls replayed from CUDA graphs (sample.py --cuda-graphs)
    cpu_threads     CPU threads and OpenMP waits for the cores that are free (imported by every script before torch)
    demo_recipe     the demo's MNIST recipe and sample quality, shared by demo.py and experiments/
"""
