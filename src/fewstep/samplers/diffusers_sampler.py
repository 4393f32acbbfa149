"""Drive any DDPM-type diffusers scheduler with our denoiser (and so with every strategy).

The scheduler is built from our schedule: num_train_timesteps = N, trained_betas = schedule.betas,
prediction_type = "epsilon" (a Denoiser always returns eps, whatever the backbone predicts),
plus the user's kwargs (e.g. {solver_order: 3}, {timestep_spacing: trailing}, {clip_sample: false}).
The loop is the one of diffusers' pipelines:

    set_timesteps(steps); x = z * init_noise_sigma
    for t in timesteps: eps = model(scale_model_input(x, t), float(t)); x = step(eps, t, x).prev_sample

Randomness of stochastic schedulers (DDPM, DDIM eta > 0, Euler ancestral, SDE-DPM-Solver++, ...):
when `noise` is a SampleNoise, its per-sample generators are passed as `step(..., generator=[g_0, ..,
g_B-1])`; diffusers' randn_tensor then draws row b from g_b, continuing that sample's own stream, so
samples do not depend on batch composition. Schedulers whose step takes no generator draw nothing.
With any other `noise` the scheduler uses torch's global RNG.
Use it to compare with solvers fewstep does not implement natively (UniPC, DEIS, SA-Solver, PNDM, ...).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

EXAMPLES = ("UniPCMultistepScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
            "HeunDiscreteScheduler", "DEISMultistepScheduler", "PNDMScheduler", "DDPMScheduler")


def scheduler_class(name: str):
    """The diffusers scheduler class called `name`; ValueError unless it is a usable DDPM-type scheduler."""
    import diffusers

    hint = f"(e.g. {', '.join(EXAMPLES[:6])})"
    try:
        cls = getattr(diffusers, str(name)) if str(name).endswith("Scheduler") else None
        init = inspect.signature(cls.__init__).parameters if cls is not None else {}
        step = inspect.signature(cls.step).parameters if cls is not None else {}
    except (AttributeError, ImportError, TypeError, ValueError) as e:
        if isinstance(e, ImportError):
            raise ValueError(f"diffusers scheduler '{name}' needs a missing package: {str(e).strip().splitlines()[0]}") from None
        cls = None
    if cls is None:
        raise ValueError(f"unknown diffusers scheduler '{name}' {hint}")
    required = [p for p, v in list(step.items())[1:] if v.default is inspect.Parameter.empty
                and v.kind in (v.POSITIONAL_ONLY, v.POSITIONAL_OR_KEYWORD)]
    if "trained_betas" not in init or set(required) - {"model_output", "timestep", "sample"}:
        raise ValueError(f"diffusers scheduler '{name}' is not a DDPM-type denoising scheduler {hint}")
    return cls


def build_scheduler(name: str, schedule, kwargs: Optional[dict] = None):
    cls = scheduler_class(name)
    init = inspect.signature(cls.__init__).parameters
    args = dict(num_train_timesteps=schedule.N, trained_betas=schedule.betas.tolist())
    if "prediction_type" in init:
        args["prediction_type"] = "epsilon"
    args.update(kwargs or {})
    return cls(**args)


def planned_calls(schedule, scheduler: str, steps: int, kwargs: Optional[dict] = None) -> int:
    """How many model calls `scheduler` makes for `steps` steps: its timestep list after set_timesteps
    (HeunDiscreteScheduler, for one, repeats the inner timesteps: 2 steps - 1 calls)."""
    sched = build_scheduler(scheduler, schedule, kwargs)
    sched.set_timesteps(steps)
    return len(sched.timesteps)


def sample_diffusers(model, z: torch.Tensor, schedule, scheduler: str, steps: int, kwargs: Optional[dict] = None,
                     noise=None, callback=None, extra_args=None) -> torch.Tensor:
    """Run diffusers' `scheduler` for `steps` steps from z ~ N(0, I). callback(i, t, x_vp, x0) at each call,
    with x_vp = the scaled model input."""
    extra_args = extra_args or {}
    sched = build_scheduler(scheduler, schedule, kwargs)
    sched.set_timesteps(steps, device=z.device)
    step_kwargs = {}
    if "generator" in inspect.signature(sched.step).parameters and hasattr(noise, "generators"):
        step_kwargs["generator"] = list(noise.generators)
    x = z * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        eps = model(x_in, float(t), **extra_args)
        if callback is not None:
            callback(i, float(t), x_in, schedule.x0_from_eps(x_in, float(t), eps))
        x = sched.step(eps, t, x, **step_kwargs).prev_sample
    return x
