"""Benchmark: per-step overhead of fewstep's native DDIM / DPM-Solver++ loops vs diffusers' own loops.

Both loops drive the same UNet2DModel (random weights; nothing downloads) on the same timesteps and
noise. A timer inside the network call separates model time from everything else, so

    loop time / step      = what a user waits per step
    overhead / step       = loop - model time: the sampler's own arithmetic (and, for fewstep, the
                            Denoiser's eps -> x0 conversion and NFE bookkeeping)

Variants are interleaved repeat by repeat (so machine load drifts hit them alike) and the minimum
over repeats is reported (as timeit does: other processes only ever add time). Run:  python -m fewstep.bench.samplers [--models cifar10,small] [--batch 4]
[--steps 10] [--repeats 3]; it writes experiments/bench/samplers.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..denoiser import Denoiser
from ..samplers.ddim import sample_ddim
from ..samplers.dpmpp import sample_dpmpp
from ..schedule import NoiseSchedule
from . import write_report

MODELS = {
    # google/ddpm-cifar10-32 (Ho et al. 2020 CIFAR-10 model), random weights
    "cifar10": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    layers_per_block=2,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # a small 28x28 one (Fashion-MNIST size)
    "small": dict(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                  layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}


class TimedUNet(nn.Module):
    """unet(x, t).sample, accumulating the seconds spent inside the network."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.seconds = unet, 0.0

    def forward(self, x, t):
        start = time.perf_counter()
        out = self.unet(x, t).sample
        self.seconds += time.perf_counter() - start
        return out


def _diffusers_loop(sched, net: TimedUNet, z, steps, timesteps=None):
    if timesteps is None:
        sched.set_timesteps(steps)
    else:
        sched.set_timesteps(timesteps=timesteps)
    x = z * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = net(sched.scale_model_input(x, t), t)
        x = sched.step(eps, t, x).prev_sample
    return x


def _variants(unet, schedule, steps):
    """name -> (kind, callable(z) -> x) with the shared TimedUNet; DDIM on diffusers' leading spacing,
    DPM-Solver++(2M) on diffusers' default linspace spacing."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    net = TimedUNet(unet)
    model = Denoiser(net, schedule)
    base = dict(num_train_timesteps=schedule.N, trained_betas=schedule.betas.tolist())
    ddim = DDIMScheduler(**base, clip_sample=False)
    ddim.set_timesteps(steps)
    ts_ddim = ddim.timesteps.numpy().astype(np.float64)
    dpm = DPMSolverMultistepScheduler(**base, algorithm_type="dpmsolver++", solver_order=2)
    dpm.set_timesteps(steps)
    ts_dpm = dpm.timesteps.numpy().astype(np.float64)
    return net, {
        ("DDIM", "fewstep"): lambda z: sample_ddim(model, z, ts_ddim, schedule),
        ("DDIM", "diffusers"): lambda z: _diffusers_loop(ddim, net, z, steps),
        ("DPM-Solver++(2M)", "fewstep"): lambda z: sample_dpmpp(model, z, ts_dpm, schedule, order=2),
        ("DPM-Solver++(2M)", "diffusers"): lambda z: _diffusers_loop(dpm, net, z, steps),
    }


@torch.no_grad()
def bench_model(name: str, batch: int = 4, steps: int = 10, repeats: int = 3, seed: int = 0) -> list:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**MODELS[name]).eval()
    params = sum(p.numel() for p in unet.parameters())
    schedule = NoiseSchedule.from_config("linear", 1000)
    cfg = MODELS[name]
    z = torch.randn(batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"],
                    generator=torch.Generator().manual_seed(seed))
    net, variants = _variants(unet, schedule, steps)
    unet(z, 999)                                                   # warm-up (allocator, kernels)
    times = {k: [] for k in variants}
    outs = {}
    for _ in range(repeats):
        for key, run in variants.items():
            net.seconds = 0.0
            start = time.perf_counter()
            outs[key] = run(z)
            total = time.perf_counter() - start
            times[key].append((total / steps, net.seconds / steps))
    rows = []
    for sampler in ("DDIM", "DPM-Solver++(2M)"):
        r = {"model": name, "params_M": params / 1e6, "sampler": sampler, "batch": batch, "steps": steps,
             "max_abs_diff": (outs[(sampler, "fewstep")] - outs[(sampler, "diffusers")]).abs().max().item()}
        for impl in ("fewstep", "diffusers"):
            loop = min(t for t, _ in times[(sampler, impl)])
            model = min(m for _, m in times[(sampler, impl)])
            over = min(t - m for t, m in times[(sampler, impl)])
            r.update({f"{impl}_loop_ms": 1e3 * loop, f"{impl}_model_ms": 1e3 * model, f"{impl}_overhead_ms": 1e3 * over})
        rows.append(r)
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import diffusers
    return (f"{cpu_name()} (platform.processor() = {platform.processor()!r}), {platform.system()} "
            f"{platform.release()}; os.cpu_count() = {os.cpu_count()}, torch threads = {torch.get_num_threads()}; "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}")


def to_markdown(rows: list, repeats: int) -> str:
    lines = [
        "# Sampler loop overhead: fewstep native vs diffusers schedulers",
        "",
        f"Machine: {machine()}.",
        "",
        "Same UNet2DModel (random weights), same timesteps and noise; per step, minimum over "
        f"{repeats} interleaved repeats. *Loop* = wall time of the whole sampling loop / steps; "
        "*overhead* = loop minus the time spent inside the UNet (sampler arithmetic, for fewstep also "
        "the Denoiser's eps/x0 conversion and NFE counting). Ratio = fewstep / diffusers (< 1: fewstep is cheaper).",
        "",
        "| model | params | sampler | batch x steps | loop ms/step fewstep | diffusers | ratio "
        "| overhead ms/step fewstep | diffusers | ratio | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params_M']:.1f}M | {r['sampler']} | {r['batch']} x {r['steps']} "
            f"| {r['fewstep_loop_ms']:.2f} | {r['diffusers_loop_ms']:.2f} | {r['fewstep_loop_ms'] / r['diffusers_loop_ms']:.3f} "
            f"| {r['fewstep_overhead_ms']:.3f} | {r['diffusers_overhead_ms']:.3f} "
            f"| {r['fewstep_overhead_ms'] / r['diffusers_overhead_ms']:.2f} | {r['max_abs_diff']:.1e} |")
    lines += ["", "Model time per step (ms; same network in both loops, a check on noise): " + "; ".join(
        f"{r['model']} {r['sampler']}: {r['fewstep_model_ms']:.1f} / {r['diffusers_model_ms']:.1f}" for r in rows), ""]
    return "\n".join(lines)


def main(out_dir: str = "experiments/bench", models=("cifar10", "small"), batch: int = 4, steps: int = 10,
         repeats: int = 3) -> Path:
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown benchmark model '{m}' (choose from {', '.join(MODELS)})")
    if batch < 1 or steps < 2 or repeats < 1:
        raise ValueError(f"need batch >= 1, steps >= 2, repeats >= 1 (got {batch}, {steps}, {repeats})")
    rows = [r for m in models for r in bench_model(m, batch, steps, repeats)]
    return write_report(out_dir, "samplers.md", to_markdown(rows, repeats))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="experiments/bench")
    p.add_argument("--models", default="cifar10,small", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    main(a.out_dir, tuple(a.models.split(",")), a.batch, a.steps, a.repeats)
