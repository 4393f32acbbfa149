"""Benchmark: block caching (cache=block) on a DiT of DiT-XL/2's width, wall-clock vs MACs speedup.

The transformer form of DeepCache (strategies/block_cache.py): a full call every N caches what the middle
blocks add to the token stream; partial calls recompute the first `first` and the last `last` blocks. The
network is diffusers' DiTTransformer2DModel with DiT-XL/2's width (hidden 1152 = 16 heads x 72, patch 2,
learned sigma: 8 output channels of 4, 1000 classes + the null class) at reduced depth, on a small latent
(16 x 16 x 4: 64 tokens), random weights (nothing downloads), sampled with DDIM (eta = 0) and
classifier-free guidance (scale 4, DiTPipeline's default: both rows in one call, both cached). Columns as in
the DeepCache bench (bench/deepcache.py, whose lock-step runner this reuses):

    MACs / image     = n_full * MACs_full + n_partial * MACs_partial       (FlopCounterMode, per row x 2 rows)
    wall speedup     = wall(N = 1) / wall(N)        N = 1: no cache (the plain network every call)
    MACs speedup     = MACs(N = 1) / MACs(N)
    ratio            = wall speedup / MACs speedup

All variants sample in lock-step (step k of each, in rotating order, then step k + 1), each summing the time
of its own steps and keeping each step's fastest repeat, so the ratios are measured side by side under the
same machine load. Per-call times (fastest of interleaved single calls) price the same runs again.

Run:  python -m fewstep.bench.block_cache [--quick] [--layers 8] [--size 1x20] [--render]
It writes experiments/bench/block_cache.md and block_cache.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..backbones.dit import DiTAdapter, check_blocks
from ..denoiser import Denoiser
from ..fileio import write_text_atomic
from ..schedule import NoiseSchedule, select_timesteps
from ..strategies.block_cache import BlockCache
from ..strategies.guidance import Guidance
from .deepcache import Conditioned, add_speedups, cost_lines, measured, warm_and_run

# DiT-XL/2 (Peebles & Xie 2023): 28 layers, hidden 1152, 16 heads, patch 2, 32 x 32 x 4 latent at 256 px
ARCH = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=8,
            sample_size=16, patch_size=2, num_embeds_ada_norm=1000)
INTERVALS = (1, 2, 3, 5)
BLOCKS = ((1, 1), (1, 0))          # (first, last): DeepCache's shallow path around the middle; FBCache's split
SIZE = (1, 20)                     # (batch, DDIM steps); with CFG each call computes 2 rows per image
QUICK = dict(layers=4, size=(1, 6))
SCALE = 4.0                        # DiTPipeline's default guidance scale


class Labelled(Conditioned):
    """A Denoiser with fixed class labels, callable as model(x, t) (what the lock-step runner calls)."""

    def __init__(self, model: Denoiser, labels: torch.Tensor):
        super().__init__(model, class_labels=labels)
        self.labels = labels


def time_calls(models: Dict[Tuple[int, int], Labelled], z, rounds: int) -> Dict[tuple, Dict[str, float]]:
    """Seconds of one full and one partial (guided) call per blocks setting: fastest of `rounds` rounds."""
    best = {k: {} for k in models}
    with torch.no_grad():
        for _ in range(rounds):
            for k, m in models.items():
                m.reset()
                for t in (500.0, 490.0):                   # full, then partial (interval 2)
                    before = dict(m.calls)
                    start = time.perf_counter()
                    m(z, t)
                    dt = time.perf_counter() - start
                    kind = next(c for c in m.calls if m.calls[c] != before.get(c, 0))
                    best[k][kind] = min(dt, best[k].get(kind, math.inf))
    return best


def bench(layers: int, batch: int, steps: int, intervals: Sequence[int], blocks: Sequence[Tuple[int, int]],
          repeats: int, rounds: int, arch: Optional[dict] = None) -> Dict:
    from diffusers import DiTTransformer2DModel

    arch = {**ARCH, "num_layers": layers, **(arch or {})}
    for b in blocks:
        check_blocks(b, arch["num_layers"])
    torch.manual_seed(0)
    net = DiTTransformer2DModel(**arch).eval()
    adapter = DiTAdapter(net)
    schedule = NoiseSchedule.from_config()
    ts = select_timesteps(schedule, steps, "leading")
    c, s = arch["in_channels"], arch["sample_size"]
    z = torch.randn(batch, c, s, s, generator=torch.Generator().manual_seed(0))
    y = torch.arange(batch) * 97 % arch["num_embeds_ada_norm"]
    null = arch["num_embeds_ada_norm"]
    rows2 = torch.cat([y, torch.full_like(y, null)])
    macs = {}
    for b in blocks:
        macs.update(BlockCache(2, *b).measure_macs(adapter, torch.cat([z[:1], z[:1]]), class_labels=rows2[[0, batch]]))
    macs = {k: 2 * v for k, v in macs.items()}          # per image: its conditional and unconditional row

    def denoiser(cache):
        return Labelled(Denoiser(adapter, schedule, cache=cache, guidance=Guidance(SCALE), null_label=null), y)

    variants = {(1, None): denoiser(None)}
    for b in blocks:
        for n in intervals:
            if n > 1:
                variants[(n, b)] = denoiser(BlockCache(n, *b))
    wall, outs = warm_and_run(variants, z, ts, schedule, repeats)
    per_call = time_calls({b: denoiser(BlockCache(2, *b)) for b in blocks}, z, rounds)
    base = (1, None)
    ref = outs[base].double()
    rows = []
    for (n, b), m in variants.items():
        calls = dict(m.calls)
        kind = None if b is None else f"partial@{b[0]}+{b[1]}"
        n_full, n_part = calls.get("full", 0), calls.get(kind, 0) if kind else 0
        run_macs = n_full * macs["full"] + (n_part * macs[kind] if kind else 0)
        pc = per_call[b] if b is not None else per_call[blocks[0]]
        call_time = n_full * pc["full"] + (n_part * pc[kind] if kind else 0)
        rows.append(dict(interval=n, first=None if b is None else b[0], last=None if b is None else b[1],
                         full=n_full, partial=n_part, wall_s=wall[(n, b)], macs_per_image=run_macs,
                         call_time_s=call_time, rel_dev=float((outs[(n, b)].double() - ref).norm() / ref.norm())))
    add_speedups(rows)
    params = sum(p.numel() for p in net.parameters())
    return dict(arch=arch, params=params, batch=batch, steps=steps, scale=SCALE, macs=macs,
                per_call={f"{b[0]}+{b[1]}": v for b, v in per_call.items()}, rows=rows)


def write_markdown(res: Dict, path: Path, machine_desc: str, note: str, command: str, total_s: float):
    a, macs = res["arch"], res["macs"]
    width = a["num_attention_heads"] * a["attention_head_dim"]
    lines = ["# Block caching (cache=block) on a DiT: wall-clock vs MACs speedup", "",
             f"Machine: {machine_desc}. {note}", f"Generated by `{command}`; total bench time {total_s / 60:.1f} min.", "",
             f"diffusers DiTTransformer2DModel of DiT-XL/2's width at reduced depth: {a['num_layers']} layers, hidden "
             f"{width} ({a['num_attention_heads']} heads x {a['attention_head_dim']}), patch {a['patch_size']}, latent "
             f"{a['sample_size']} x {a['sample_size']} x {a['in_channels']} ({(a['sample_size'] // a['patch_size']) ** 2} "
             f"tokens), {a['out_channels']} output channels (learned sigma), {a['num_embeds_ada_norm']} classes + null; "
             f"{res['params'] / 1e6:.0f}M parameters, random weights. DDIM (eta = 0, leading timesteps), "
             f"{res['steps']} steps, batch {res['batch']}, classifier-free guidance scale {res['scale']} (each call: "
             f"the conditional and the unconditional row, both cached). N = 1 is the plain network at every call.", "",
             "* **wall x** = wall(N=1) / wall, whole sampling runs of all variants in lock-step (step k of every "
             "variant, rotating order, before step k + 1; each step its fastest repeat): the ratios are measured "
             "side by side in one run under the same machine load.",
             "* **MACs x** from FlopCounterMode (FLOPs / 2, attention through the math SDPA path) times the run's "
             "counted full / partial calls; **/MACs** = speedup / MACs speedup (1 = time follows MACs).",
             "* **call-time x**: the runs priced with per-call times (fastest of interleaved single calls).",
             "* first + last = blocks recomputed at a partial call (1 + 1: DeepCache's shallow path around the cached "
             "middle; 1 + 0: the split of diffusers' first-block cache, here on DeepCache's fixed schedule). "
             "rel. dev. = ||x_0 - x_0(N=1)|| / ||x_0(N=1)|| from the same noise (random weights: it only shows that "
             "the cache changes the output).", ""]
    lines += cost_lines(macs, res["per_call"], res["batch"], str)
    lines += ["| N | first + last | full / partial calls | wall s | GMACs/image | wall x | MACs x | wall /MACs | "
              "call-time x | call-time /MACs | rel. dev. |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        fl = "-" if r["first"] is None else f"{r['first']} + {r['last']}"
        lines.append(f"| {r['interval']} | {fl} | {r['full']} / {r['partial']} | {r['wall_s']:.2f} | "
                     f"{r['macs_per_image'] / 1e9:.1f} | {r['wall_speedup']:.2f}x | {r['macs_speedup']:.2f}x | "
                     f"{r['ratio']:.2f} | {r['call_time_speedup']:.2f}x | {r['call_time_ratio']:.2f} | {r['rel_dev']:.3g} |")
    write_text_atomic(path, "\n".join(lines) + "\n")


def main(out_dir: str = "experiments/bench", quick: bool = False, layers: Optional[int] = None,
         size: Optional[Tuple[int, int]] = None, intervals: Sequence[int] = INTERVALS,
         blocks: Sequence[Tuple[int, int]] = BLOCKS, repeats: int = 2, rounds: int = 5, arch: Optional[dict] = None,
         note: str = "", command: str = "python -m fewstep.bench.block_cache") -> Dict:
    """Run the benchmark and write <out_dir>/block_cache.md and block_cache.json; returns the result dict."""
    layers = layers or (QUICK["layers"] if quick else ARCH["num_layers"])
    batch, steps = size or (QUICK["size"] if quick else SIZE)
    if 1 not in intervals:
        intervals = (1,) + tuple(intervals)
    res = measured(lambda: bench(layers, batch, steps, intervals, [tuple(b) for b in blocks], repeats, rounds, arch),
                   repeats, rounds, note, command)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "block_cache.json", json.dumps(res, indent=1))
    write_markdown(res, out / "block_cache.md", res["machine"], res["note"], command, res["total_s"])
    print((out / "block_cache.md").read_text())
    return res


def render(out_dir: str = "experiments/bench"):
    """(Re)write block_cache.md from block_cache.json, no measurement."""
    out = Path(out_dir)
    res = json.loads((out / "block_cache.json").read_text())
    write_markdown(res, out / "block_cache.md", res["machine"], res["note"], res["command"], res["total_s"])


def _cli():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="experiments/bench")
    p.add_argument("--quick", action="store_true", help="4 layers, 6 steps")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--size", default=None, metavar="BATCHxSTEPS", help="e.g. 1x20")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--note", default="", help="free text written under the machine line")
    p.add_argument("--render", action="store_true", help="only rewrite block_cache.md from block_cache.json")
    a = p.parse_args()
    size = None if a.size is None else tuple(int(v) for v in a.size.lower().split("x"))
    if a.render:
        return render(a.out_dir)
    import shlex
    import sys

    main(a.out_dir, a.quick, a.layers, size, repeats=a.repeats, rounds=a.rounds, note=a.note,
         command=shlex.join(["python", "-m", "fewstep.bench.block_cache", *sys.argv[1:]]))


if __name__ == "__main__":
    _cli()
