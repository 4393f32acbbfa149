"""Benchmark: DeepCache on a UNet2DConditionModel of Stable Diffusion 1.5's architecture, wall vs MACs speedup.

DeepCache's headline model (Ma et al. 2024: SD v1.5, 50 PLMS steps, 2.3x at N = 5 on its GPU) with random
weights (nothing downloads): diffusers' UNet2DConditionModel with SD-1.5's config (block_out_channels
320 / 640 / 1280 / 1280, 2 layers per block, cross-attention in the three upper levels, 8 heads,
cross_attention_dim 768 for CLIP ViT-L/14's 77 x 768 prompt embeddings), 860M parameters, on a small latent
(16 x 16 x 4: a 128 x 128 image) so that it runs on a CPU in minutes. DDIM (eta = 0, the pipeline's
"leading" timesteps with steps_offset 1) with classifier-free guidance at SD's default scale 7.5: each call
computes the conditional and the unconditional row in one batch, DeepCache caches both. Columns as in the
DeepCache bench (bench/deepcache.py, whose lock-step runner this uses):

    MACs / image     = n_full * MACs_full + n_partial * MACs_partial       (FlopCounterMode, 2 rows per image)
    wall speedup     = wall(N = 1) / wall(N, m)      N = 1: every call full
    MACs speedup     = MACs(N = 1) / MACs(N, m)
    ratio            = wall speedup / MACs speedup

All variants sample in lock-step (step k of each, in rotating order, then step k + 1), each summing the time of
its own steps (its fastest repeat per step), so their ratios are measured side by side under the same load.

Run:  python -m fewstep.bench.sd_deepcache [--quick] [--size 1x10] [--latent 16] [--render]
It writes experiments/bench/sd_deepcache.md and sd_deepcache.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..backbones.sd_unet import SDUNetAdapter
from ..denoiser import Denoiser
from ..fileio import write_text_atomic
from ..schedule import NoiseSchedule, select_timesteps
from ..strategies.cache import DeepCache
from ..strategies.guidance import Guidance
from .block_cache import time_calls
from .deepcache import Conditioned, add_speedups, cost_lines, measured, warm_and_run

# Stable Diffusion v1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json), but sample_size
SD15 = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
TEXT = (77, 768)                    # CLIP ViT-L/14 prompt embeddings
INTERVALS = (1, 2, 3, 5)
BRANCHES = (0, 1)                   # m = 0: conv_in's output (the shallowest path); m = 1: after the first resnet + attention
SIZE = (1, 10)                      # (batch, DDIM steps); with CFG each call computes 2 rows per image
QUICK = dict(size=(1, 4), latent=8)
SCALE = 7.5                         # StableDiffusionPipeline's default guidance scale
PAPER = {"N": 5, "speedup": 2.3, "what": "SD v1.5, 50 PLMS steps, GPU (3.34 s -> 1.54 s per image, Ma et al. 2024)"}


def sd_schedule() -> NoiseSchedule:
    return NoiseSchedule.from_config("scaled_linear", 1000, 0.00085, 0.012)


def bench(batch: int, steps: int, latent: int, intervals: Sequence[int], branches: Sequence[int], repeats: int,
          rounds: int, arch: Optional[dict] = None) -> Dict:
    from diffusers import UNet2DConditionModel

    arch = {**SD15, "sample_size": latent, **(arch or {})}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**arch).eval()
    adapter = SDUNetAdapter(unet)
    schedule = sd_schedule()
    ts = select_timesteps(schedule, steps, "leading", offset=1)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, arch["in_channels"], latent, latent, generator=g)
    text = torch.randn(batch, TEXT[0], arch["cross_attention_dim"], generator=g)
    neg = torch.randn(1, TEXT[0], arch["cross_attention_dim"], generator=g)
    two = torch.cat([text[:1], neg])
    macs = {}
    for m in branches:
        macs.update(DeepCache(2, m).measure_macs(adapter, torch.cat([z[:1], z[:1]]), encoder_hidden_states=two))
    macs = {k: 2 * v for k, v in macs.items()}          # per image: its conditional and unconditional row

    def denoiser(cache):
        return Conditioned(Denoiser(adapter, schedule, cache=cache, guidance=Guidance(SCALE),
                                    null_cond={"encoder_hidden_states": neg}), encoder_hidden_states=text)

    variants = {(1, None): denoiser(None)}
    for m in branches:
        for n in intervals:
            if n > 1:
                variants[(n, m)] = denoiser(DeepCache(n, m, num_skips=adapter.num_skips))
    wall, outs = warm_and_run(variants, z, ts, schedule, repeats)
    per_call = time_calls({m: denoiser(DeepCache(2, m)) for m in branches}, z, rounds)
    ref = outs[(1, None)].double()
    rows = []
    for (n, m), v in variants.items():
        calls = dict(v.calls)
        kind = None if m is None else f"partial@{m}"
        n_full, n_part = calls.get("full", 0), calls.get(kind, 0) if kind else 0
        pc = per_call[m if m is not None else branches[0]]
        rows.append(dict(interval=n, branch=m, full=n_full, partial=n_part, wall_s=wall[(n, m)],
                         macs_per_image=n_full * macs["full"] + (n_part * macs[kind] if kind else 0),
                         call_time_s=n_full * pc["full"] + (n_part * pc[kind] if kind else 0),
                         rel_dev=float((outs[(n, m)].double() - ref).norm() / ref.norm())))
    add_speedups(rows)
    params = sum(p.numel() for p in unet.parameters())
    return dict(arch={k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}, params=params, batch=batch,
                steps=steps, scale=SCALE, num_skips=adapter.num_skips, macs=macs,
                per_call={str(m): v for m, v in per_call.items()}, rows=rows)


def write_markdown(res: Dict, path: Path):
    a, macs = res["arch"], res["macs"]
    lat = a["sample_size"]
    lines = ["# DeepCache on Stable Diffusion 1.5's UNet: wall-clock vs MACs speedup", "",
             f"Machine: {res['machine']}. {res['note']}",
             f"Generated by `{res['command']}`; total bench time {res['total_s'] / 60:.1f} min.", "",
             f"diffusers UNet2DConditionModel with SD-1.5's config (block_out_channels {a['block_out_channels']}, "
             f"{a['layers_per_block']} layers per block, cross_attention_dim {a['cross_attention_dim']}, "
             f"{res['num_skips']} skips), {res['params'] / 1e6:.0f}M parameters, random weights, latent {lat} x {lat} x "
             f"{a['in_channels']} (a {8 * lat} x {8 * lat} image; SD-1.5 samples 64 x 64), prompt embeddings 77 x "
             f"{a['cross_attention_dim']}. DDIM (eta = 0, leading timesteps + steps_offset 1), {res['steps']} steps, "
             f"batch {res['batch']}, classifier-free guidance scale {res['scale']} (each call: the conditional and "
             f"the unconditional row, both cached). N = 1 is every call full; uniform 1:N schedule.", "",
             "* **wall x** = wall(N=1) / wall, whole sampling runs of all variants in lock-step (step k of every "
             "variant, rotating order, before step k + 1; each step its fastest repeat).",
             "* **MACs x** from FlopCounterMode (FLOPs / 2, attention through the math SDPA path) times the run's "
             "counted full / partial calls; **/MACs** = speedup / MACs speedup (1 = time follows MACs).",
             "* **call-time x**: the runs priced with per-call times (fastest of interleaved single calls).",
             "* branch m = skip index (0 = conv_in's output: a partial call runs conv_in, the last decoder "
             "resnet + cross-attention and conv_out; 1 = also the first down resnet + attention and the last two "
             "decoder layers). rel. dev. = ||x_0 - x_0(N=1)|| / ||x_0(N=1)|| from the same noise (random weights: "
             "it only shows that the cache changes the output).", "",
             f"Paper anchor: {PAPER['speedup']}x at N = {PAPER['N']} ({PAPER['what']}).", ""]
    lines += cost_lines(macs, res["per_call"], res["batch"], lambda m: f"m = {m}")
    lines += ["| N | branch | full / partial calls | wall s | GMACs/image | wall x | MACs x | wall /MACs | "
              "call-time x | call-time /MACs | rel. dev. |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['interval']} | {'-' if r['branch'] is None else r['branch']} | {r['full']} / {r['partial']} | "
                     f"{r['wall_s']:.2f} | {r['macs_per_image'] / 1e9:.1f} | {r['wall_speedup']:.2f}x | "
                     f"{r['macs_speedup']:.2f}x | {r['ratio']:.2f} | {r['call_time_speedup']:.2f}x | "
                     f"{r['call_time_ratio']:.2f} | {r['rel_dev']:.3g} |")
    write_text_atomic(path, "\n".join(lines) + "\n")


def main(out_dir: str = "experiments/bench", quick: bool = False, size: Optional[Tuple[int, int]] = None,
         latent: Optional[int] = None, intervals: Sequence[int] = INTERVALS, branches: Sequence[int] = BRANCHES,
         repeats: int = 1, rounds: int = 3, arch: Optional[dict] = None, note: str = "",
         command: str = "python -m fewstep.bench.sd_deepcache") -> Dict:
    """Run the benchmark and write <out_dir>/sd_deepcache.md and sd_deepcache.json; returns the result dict."""
    batch, steps = size or (QUICK["size"] if quick else SIZE)
    latent = latent or (QUICK["latent"] if quick else SD15["sample_size"])
    if 1 not in intervals:
        intervals = (1,) + tuple(intervals)
    res = measured(lambda: bench(batch, steps, latent, intervals, list(branches), repeats, rounds, arch),
                   repeats, rounds, note, command)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "sd_deepcache.json", json.dumps(res, indent=1))
    write_markdown(res, out / "sd_deepcache.md")
    print((out / "sd_deepcache.md").read_text())
    return res


def render(out_dir: str = "experiments/bench"):
    """(Re)write sd_deepcache.md from sd_deepcache.json, no measurement."""
    out = Path(out_dir)
    write_markdown(json.loads((out / "sd_deepcache.json").read_text()), out / "sd_deepcache.md")


def _cli():
    import shlex
    import sys

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="experiments/bench")
    p.add_argument("--quick", action="store_true", help="8 x 8 latent, 4 steps")
    p.add_argument("--size", default=None, metavar="BATCHxSTEPS", help="e.g. 1x10")
    p.add_argument("--latent", type=int, default=None, help="latent side (SD-1.5 at 512 px: 64)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--note", default="", help="free text written under the machine line")
    p.add_argument("--render", action="store_true", help="only rewrite sd_deepcache.md from sd_deepcache.json")
    a = p.parse_args()
    if a.render:
        return render(a.out_dir)
    size = None if a.size is None else tuple(int(v) for v in a.size.lower().split("x"))
    main(a.out_dir, a.quick, size, a.latent, repeats=a.repeats, rounds=a.rounds, note=a.note,
         command=shlex.join(["python", "-m", "fewstep.bench.sd_deepcache", *sys.argv[1:]]))


if __name__ == "__main__":
    _cli()
