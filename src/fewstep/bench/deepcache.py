"""Benchmark: DeepCache wall-clock speedup vs MACs speedup, eager and torch.compile'd.

For each model, DDIM (eta = 0) sampling runs with interval N in {1, 2, 3, 5, 10} and two branches.
N = 1 (every call full) is the baseline. All numbers come from one invocation:

    MACs / image     = n_full * MACs_full + n_partial * MACs_partial      (FlopCounterMode, per sample)
    wall speedup     = wall(N = 1) / wall(N, m)
    MACs speedup     = MACs(N = 1) / MACs(N, m)
    ratio            = wall speedup / MACs speedup   (1 = time follows MACs; < 1 = fixed per-call costs)
    rel. dev.        = ||x_0 - x_0(N = 1)|| / ||x_0(N = 1)||, same initial noise

All variants of a model, eager and compiled, sample in lock-step (step k of each, in rotating order,
then step k + 1) and each sums the time of its own steps, so load changes on a shared machine hit every
variant alike; each step counts with its fastest repeat. Per-call times (fastest of many interleaved single calls) price the same runs again.
Compile time is spent in an untimed warm-up call of each graph.

Models: the small 28x28 Fashion-MNIST UNet (the shipped checkpoints/fashion_mnist/unet when it
exists, else the same architecture with random weights) and the google/ddpm-cifar10-32
architecture with random weights (the paper's DDPM CIFAR-10 model; nothing downloads).

Run:  python -m fewstep.bench.deepcache [--quick] [--models fashion_mnist,cifar10] [--modes eager,compiled]
It writes experiments/bench/deepcache.md and deepcache.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..backbones.unet import UNetAdapter
from ..denoiser import Denoiser
from ..fileio import write_text_atomic
from ..samplers.ddim import generalized_step, jumps
from ..schedule import NoiseSchedule, select_timesteps
from ..strategies.cache import DeepCache

REPO = Path(__file__).resolve().parents[3]
FASHION_CKPT = REPO / "checkpoints" / "fashion_mnist" / "unet"

ARCHS = {
    "fashion_mnist": dict(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 128),
                          layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                          attention_head_dim=32),
    # google/ddpm-cifar10-32 (Ho et al. 2020), the paper's DDPM CIFAR-10 backbone
    "cifar10": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    layers_per_block=2,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}

# (batch, steps) per model. Full: the paper's protocol (DDIM 100 steps) at batch 64; on a CPU the
# cifar10 model at batch 64 takes ~5 s per full call (2 cores), so it runs at batch 4 there. Per image a
# CPU is about as fast at batch 4 as at larger batches (one eager full-call timing of the cifar10 model on
# the 2-core machine: 0.079 s/image at batch 4, 0.078 at batch 16); a GPU is not.
SIZES = {"fashion_mnist": (64, 100), "cifar10": (64, 100)}
CPU_SIZES = {"fashion_mnist": (64, 100), "cifar10": (4, 100)}
QUICK_SIZES = {"fashion_mnist": (4, 10), "cifar10": (1, 10)}
INTERVALS = (1, 2, 3, 5, 10)
# Two branches per model: a shallow one, and the paper's CIFAR-10 setting m = 3 (official --branch 2).
BRANCHES = (1, 3)
QUICK_COMPILED_BRANCHES = (3,)   # compiling costs minutes per graph on a small CPU
PAPER = {2: 1.40, 3: 1.61, 5: 1.85, 10: 2.07}   # DDPM CIFAR-10, DDIM 100 steps, wall-clock (GPU)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    s = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        s += f"; GPU {torch.cuda.get_device_name()}"
    return s


def load_model(name: str):
    from diffusers import UNet2DModel

    from ..build import load_pretrained

    if name == "fashion_mnist" and (FASHION_CKPT / "config.json").exists():
        state = FASHION_CKPT / "train_state.json"
        step = json.loads(state.read_text()).get("step") if state.exists() else None
        return (load_pretrained(str(FASHION_CKPT)).eval(),
                f"trained: {FASHION_CKPT.relative_to(REPO)}" + (f" at step {step}" if step is not None else ""))
    torch.manual_seed(0)
    return UNet2DModel(**ARCHS[name]).eval(), "random weights"


class Conditioned:
    """A Denoiser with a fixed condition (class_labels=..., encoder_hidden_states=...), callable as model(x, t):
    what the lock-step runner and the per-call timers call."""

    def __init__(self, model: Denoiser, **cond):
        self.model, self.cond, self.cache = model, cond, model.cache

    def reset(self):
        self.model.reset()

    def __call__(self, x, t):
        return self.model(x, t, **self.cond)

    def x0(self, x, t, eps):
        return self.model.x0(x, t, eps)

    @property
    def calls(self):
        return self.model.calls


def lockstep_ddim(models: Dict[tuple, Denoiser], z: torch.Tensor, ts, schedule, device):
    """DDIM (eta = 0) for every variant at once, interleaved step by step (the order rotates each step).

    Each variant's wall time is the sum of its own steps (model call + DDIM update), so a change of
    machine load during the bench hits all variants alike instead of whichever run was going on.
    Returns ({variant: [seconds of each step]}, {variant: x_0}).
    """
    keys = list(models)
    xs = {k: z.clone() for k in keys}
    secs = {k: [] for k in keys}
    for model in models.values():
        model.reset()
        if model.cache is not None:
            model.cache.plan(len(ts))
    with torch.no_grad():
        for step, (t, s) in enumerate(jumps(ts)):
            ab_s = float(schedule.alpha_bar_at(s))
            r = step % len(keys)
            for k in keys[r:] + keys[:r]:
                model = models[k]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                eps = model(xs[k], t)
                x0 = model.x0(xs[k], t, eps)
                xs[k] = generalized_step(x0, eps, ab_s, 0.0, 0.0, None)     # DDIM eq. 12, eta = 0
                if device.type == "cuda":
                    torch.cuda.synchronize()
                secs[k].append(time.perf_counter() - start)
    return secs, xs


def warm_and_run(variants: Dict, z: torch.Tensor, ts, schedule, repeats: int, device=torch.device("cpu")):
    """Warm every variant (two untimed calls), then `repeats` lock-step runs: (wall seconds per variant: the
    sum over steps of each step's fastest repeat, x_0 per variant)."""
    with torch.no_grad():                                 # warm-up, untimed
        for m in variants.values():
            m.reset()
            m(z, 999.0), m(z, 989.0)
    steps_best: Dict[tuple, np.ndarray] = {}
    for _ in range(repeats):
        secs, outs = lockstep_ddim(variants, z, ts, schedule, device)
        for k, v in secs.items():
            steps_best[k] = np.minimum(steps_best.get(k, np.inf), np.asarray(v))
    return {k: float(v.sum()) for k, v in steps_best.items()}, outs


def add_speedups(rows: List[Dict]) -> None:
    """In place: wall, MACs and call-time speedups of every row against rows[0] (the N = 1 baseline) and
    their ratios to the MACs speedup."""
    b = rows[0]
    for r in rows:
        r["wall_speedup"] = b["wall_s"] / r["wall_s"]
        r["macs_speedup"] = b["macs_per_image"] / r["macs_per_image"]
        r["ratio"] = r["wall_speedup"] / r["macs_speedup"]
        r["call_time_speedup"] = b["call_time_s"] / r["call_time_s"]
        r["call_time_ratio"] = r["call_time_speedup"] / r["macs_speedup"]


def cost_lines(macs: Dict[str, float], per_call: Dict[str, Dict[str, float]], batch: int, label) -> List[str]:
    """The markdown lines of a guided bench's per-call cost: MACs per image per call (2 rows: full and each
    partial kind) and the per-call times per setting (`label(key)` names a per_call key, e.g. "m = 0")."""
    return ["MACs per image per call (2 rows): full " + f"{macs['full'] / 1e9:.2f} G; " + "; ".join(
                f"{k} {v / 1e9:.2f} G ({v / macs['full']:.1%} of full)" for k, v in macs.items() if k != "full"), "",
            "Per call (guided, batch %d): " % batch + "; ".join(
                f"{label(b)}: full {v['full'] * 1e3:.0f} ms, partial {v['partial@' + b] * 1e3:.0f} ms "
                f"(time {v['partial@' + b] / v['full']:.1%} vs MACs {macs['partial@' + b] / macs['full']:.1%} of full)"
                for b, v in per_call.items()), ""]


def measured(run, repeats: int, rounds: int, note: str, command: str) -> Dict:
    """res = run() with what made it: the machine, the note plus threads, repeats, rounds and the load average
    at start / end, the total time and the command."""
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    res = run()
    total = time.perf_counter() - start
    threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    text = (f"OMP_NUM_THREADS={threads}; {repeats} lock-step repeat(s), per-call times fastest of {rounds} rounds; "
            f"1-min load average at start / end: {load0:.1f} / {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs).")
    res.update(machine=machine(), note=(note + " " if note else "") + text, total_s=total, command=command)
    return res


def time_calls(caches: Dict[tuple, DeepCache], adapter, z, device, rounds: int) -> Dict[tuple, Dict[str, float]]:
    """Seconds of one full and one partial call per cache (key: (mode, branch)): fastest of `rounds`
    rounds, every cache once per round.

    On a loaded machine the fastest of many short timings is the robust estimate of a call's own
    cost; whole-run times (above) also carry the load of the moment.
    """
    best = {k: {} for k in caches}
    tb = torch.full((z.shape[0],), 500.0, device=device)
    with torch.no_grad():
        for _ in range(rounds):
            for k, cache in caches.items():
                cache.interval = 2
                cache.reset()
                for _call in range(2):            # full, then partial
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    _, kind = cache(adapter, z, tb)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - start
                    best[k][kind] = min(dt, best[k].get(kind, math.inf))
    return best


def bench_model(name: str, batch: int, steps: int, modes: Sequence[str], intervals: Sequence[int],
                branches: Sequence[int], repeats: int, device: torch.device, backend: str,
                rounds: int = 10, compiled_branches: Optional[Sequence[int]] = None) -> Dict:
    unet, weights = load_model(name)
    unet = unet.to(device)
    adapter = UNetAdapter(unet)
    schedule = NoiseSchedule.from_config()
    ts = select_timesteps(schedule, steps, "leading")
    c, s = unet.config.in_channels, unet.config.sample_size
    z = torch.randn(batch, c, s, s, generator=torch.Generator().manual_seed(0)).to(device)
    branches = [m for m in branches if m < adapter.num_skips]
    macs = {}
    for m in branches:
        macs.update(DeepCache(2, m).measure_macs(adapter, z[:1]))
    result = dict(model=name, weights=weights, batch=batch, steps=steps, num_skips=adapter.num_skips,
                  macs=macs, modes={})
    # every (mode, branch) graph; variants (mode, N, m): N = 1 runs every call full through the
    # first branch's full graph of that mode
    caches, variants = {}, []
    for mode in modes:
        mode_branches = branches if mode == "eager" or compiled_branches is None else \
            [m for m in branches if m in compiled_branches]
        for m in mode_branches:
            caches[(mode, m)] = DeepCache(2, m, compile=mode == "compiled", compile_backend=backend)
        variants += [(mode, 1, mode_branches[0])] + [(mode, n, m) for m in mode_branches for n in intervals if n > 1]
    warmup = {mode: 0.0 for mode in modes}
    with torch.no_grad():                            # warm-up (and compile) every graph, untimed
        for (mode, m), cache in caches.items():
            t0 = time.perf_counter()
            cache.interval = 2
            cache.reset()
            cache(adapter, z, torch.full((batch,), 999.0, device=device))
            cache(adapter, z, torch.full((batch,), 989.0, device=device))
            warmup[mode] += time.perf_counter() - t0
    # one lock-step run of all variants of all modes: eager vs compiled is compared under equal load too
    models = {(mode, n, m): Denoiser(adapter, schedule, cache=caches[(mode, m)].with_interval(n))
              for mode, n, m in variants}
    steps_best: Dict[tuple, np.ndarray] = {}
    for _ in range(repeats):                         # each step: its fastest repeat
        secs, outs = lockstep_ddim(models, z, ts, schedule, device)
        for k, v in secs.items():
            steps_best[k] = np.minimum(steps_best.get(k, np.inf), np.asarray(v))
    best = {k: float(v.sum()) for k, v in steps_best.items()}
    calls = {k: dict(model.calls) for k, model in models.items()}
    per_call = time_calls(caches, adapter, z, device, rounds)
    for mode in modes:
        mode_variants = [v for v in variants if v[0] == mode]
        pc = {m: per_call[(md, m)] for md, m in caches if md == mode}
        rows = []
        for _, n, m in mode_variants:
            k = (mode, n, m)
            n_full = calls[k].get("full", 0)
            n_part = calls[k].get(f"partial@{m}", 0)
            run_macs = n_full * macs["full"] + n_part * macs.get(f"partial@{m}", 0.0)
            call_time = n_full * pc[m]["full"] + n_part * pc[m].get(f"partial@{m}", 0.0)
            rows.append(dict(interval=n, branch=m if n > 1 else None, full=n_full, partial=n_part,
                             wall_s=best[k], images_per_s=batch / best[k], macs_per_image=run_macs,
                             call_time_s=call_time))
        add_speedups(rows)
        ref = outs[mode_variants[0]].double()
        for r, k in zip(rows, mode_variants):
            r["rel_dev"] = float((outs[k].double() - ref).norm() / ref.norm())
        # what the per-call times and MACs predict for the paper's protocol (DDIM 100 steps, uniform)
        at100 = {}
        for m in pc:
            for n in intervals:
                if n > 1:
                    nf = math.ceil(100 / n)
                    t = nf * pc[m]["full"] + (100 - nf) * pc[m][f"partial@{m}"]
                    mc = nf * macs["full"] + (100 - nf) * macs[f"partial@{m}"]
                    at100[f"{n}/{m}"] = dict(call_time_speedup=100 * pc[m]["full"] / t,
                                             macs_speedup=100 * macs["full"] / mc)
        result["modes"][mode] = dict(rows=rows, warmup_s=warmup[mode], per_call=pc, at100=at100)
        print(f"[{name} {mode}] warm-up {warmup[mode]:.0f}s; " + ", ".join(
            f"N={r['interval']}{'' if r['branch'] is None else '/m=' + str(r['branch'])}: {r['wall_speedup']:.2f}x wall, "
            f"{r['macs_speedup']:.2f}x MACs" for r in rows), flush=True)
    if "eager" in result["modes"] and "compiled" in result["modes"]:
        e, c = (result["modes"][md]["rows"][0] for md in ("eager", "compiled"))
        result["compile_speedup_baseline"] = e["wall_s"] / c["wall_s"]
        result["compile_speedup_baseline_call"] = e["call_time_s"] / c["call_time_s"]
    return result


def write_markdown(results: List[Dict], path: Path, machine_desc: str, quick: bool, threads: int, total_s: float,
                   note: str):
    lines = ["# DeepCache: wall-clock vs MACs speedup", "",
             f"Machine: {machine_desc}. {note}",
             f"Generated by `python -m fewstep.bench.deepcache{' --quick' if quick else ''}` "
             f"(OMP_NUM_THREADS={threads}); total bench time {total_s / 60:.1f} min.", "",
             "DDIM (eta = 0, leading timesteps); N = 1 (every call full) is the baseline; uniform 1:N schedule. "
             "Columns:", "",
             "* **wall**: whole sampling runs; all variants of a model, eager and compiled, run in lock-step "
             "(step k of every variant, in rotating order, before step k + 1), each variant's time summed over "
             "its own steps, so load changes on a shared machine hit all variants alike; each step timed as its "
             "fastest repeat (other processes only ever add time); "
             "**wall x** = wall(N=1) / wall.",
             "* **MACs x** = MACs(N=1) / MACs of the run, from torch FlopCounterMode (FLOPs / 2; attention "
             "counted through the math SDPA path) times the run's counted full / partial calls.",
             "* **call-time x**: the same run priced with per-call times (fastest of interleaved single "
             "full / partial calls): a second estimate; where it disagrees with **wall x**, one kind of call "
             "never met a quiet moment of the machine (trust the lock-step wall).",
             "* **/MACs**: speedup divided by MACs speedup (1 = time follows MACs; < 1 = per-call costs "
             "that do not shrink with the skipped layers: embedding, Python, kernel launches; > 1 = the skipped "
             "deep layers cost more time per MAC than the shallow ones: small low-resolution tensors, many small "
             "ops, each an OpenMP barrier -- which CPU contention makes worse).",
             "* branch m = skip index (0 = conv_in's output); m = 3 is the paper's CIFAR-10 setting "
             "(official code `--branch 2`). rel. dev. = ||x_0 - x_0(N=1)|| / ||x_0(N=1)|| from the same noise "
             "(for random weights it only shows that the cache changes the output).", "",
             "Paper anchor (Ma et al. 2024, Table: DDPM CIFAR-10, DDIM 100 steps, GPU wall-clock, branch m = 3): "
             + ", ".join(f"N = {n}: {v:.2f}x" for n, v in PAPER.items()) + ".", ""]
    for res in results:
        macs = res["macs"]
        lines += [f"## {res['model']} ({res['weights']}), batch {res['batch']}, {res['steps']} DDIM steps, "
                  f"{res['num_skips']} skips", "",
                  "MACs per image per call: full " + f"{macs['full'] / 1e9:.3f} G; " + "; ".join(
                      f"{k} {v / 1e9:.3f} G ({v / macs['full']:.1%} of full)" for k, v in macs.items() if k != "full"),
                  ""]
        for mode, block in res["modes"].items():
            lines += [f"### {mode}" + (" (torch.compile of the full and the partial forward; " if mode == "compiled"
                                       else " (") + f"untimed warm-up {block['warmup_s']:.0f} s"
                      + (", compile time depends on inductor's on-disk cache)" if mode == "compiled" else ")"), ""]
            pc = block["per_call"]
            lines += ["Per call (batch of %d): " % res["batch"] + "; ".join(
                f"m = {m}: full {v['full'] * 1e3:.0f} ms, partial {v[f'partial@{m}'] * 1e3:.0f} ms "
                f"(time {v[f'partial@{m}'] / v['full']:.1%} vs MACs {macs[f'partial@{m}'] / macs['full']:.1%} of full)"
                for m, v in pc.items()), ""]
            lines += ["| N | branch | full / partial calls | wall s | images/s | GMACs/image | wall x | MACs x | "
                      "wall /MACs | call-time x | call-time /MACs | paper wall x | rel. dev. |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in block["rows"]:
                paper = f"{PAPER[r['interval']]:.2f}x" if r["interval"] in PAPER and r["branch"] == 3 else ""
                lines.append(f"| {r['interval']} | {'-' if r['branch'] is None else r['branch']} | "
                             f"{r['full']} / {r['partial']} | {r['wall_s']:.2f} | {r['images_per_s']:.2f} | "
                             f"{r['macs_per_image'] / 1e9:.2f} | {r['wall_speedup']:.2f}x | {r['macs_speedup']:.2f}x | "
                             f"{r['ratio']:.2f} | {r['call_time_speedup']:.2f}x | {r['call_time_ratio']:.2f} | "
                             f"{paper} | {r['rel_dev']:.3g} |")
            lines += [""]
            if res["steps"] != 100:   # the measured run is not the paper's protocol: price it from per-call times
                lines += ["Predicted for the paper's protocol (100 steps, uniform; call-time x / MACs x): " + "; ".join(
                    f"N = {k.split('/')[0]}, m = {k.split('/')[1]}: {v['call_time_speedup']:.2f}x / "
                    f"{v['macs_speedup']:.2f}x" for k, v in block["at100"].items()), ""]
        if "compile_speedup_baseline" in res:
            lines += [f"torch.compile speedup of the N = 1 baseline over eager (same lock-step run): "
                      f"{res['compile_speedup_baseline']:.2f}x wall, {res['compile_speedup_baseline_call']:.2f}x "
                      "per-call time.", ""]
    write_text_atomic(path, "\n".join(lines) + "\n")


def main(out_dir: str = "experiments/bench", quick: bool = False, models: Sequence[str] = ("fashion_mnist", "cifar10"),
         modes: Sequence[str] = ("eager", "compiled"), intervals: Sequence[int] = INTERVALS,
         branches: Sequence[int] = BRANCHES, sizes: Optional[Dict[str, tuple]] = None, repeats: Optional[int] = None,
         device: str = "auto", backend: str = "inductor", note: str = "", rounds: int = 10,
         compiled_branches: Optional[Sequence[int]] = None) -> List[Dict]:
    """Run the benchmark and write <out_dir>/deepcache.md and deepcache.json; returns the result dicts.

    sizes: {model: (batch, steps)}; default the paper's 64 x 100 (on a CPU: cifar10 at 4 x 100; quick:
    small sizes for a shared CPU).
    """
    for m in models:
        if m not in ARCHS:
            raise ValueError(f"unknown model '{m}' (choose from {', '.join(ARCHS)})")
    for mode in modes:
        if mode not in ("eager", "compiled"):
            raise ValueError(f"unknown mode '{mode}' (choose from eager, compiled)")
    if 1 not in intervals:
        intervals = (1,) + tuple(intervals)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    sizes = {**(QUICK_SIZES if quick else SIZES if dev.type == "cuda" else CPU_SIZES), **(sizes or {})}
    repeats = repeats or 2
    if "compiled" in modes and backend == "inductor":
        # compile in-process: inductor's background compile workers otherwise keep the CPU busy
        # (and the first compiled calls slow) for a while after the untimed warm-up
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = 1
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    start = time.perf_counter()
    if compiled_branches is None and quick:
        compiled_branches = QUICK_COMPILED_BRANCHES
    results = [bench_model(m, *sizes[m], modes, intervals, branches, repeats, dev, backend, rounds, compiled_branches)
               for m in models]
    total = time.perf_counter() - start
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    sizes_txt = ", ".join(f"{r['model']} batch {r['batch']} x {r['steps']} steps" for r in results)
    text = (f"{repeats} lock-step repeat(s); per-call times: fastest of {rounds} rounds. Sizes: {sizes_txt}"
            + (" (quick mode: reduced from the paper's batch 64 x 100 DDIM steps to fit a small CPU)." if quick else "."))
    text += f" 1-min load average at start / end: {load0:.1f} / {load1:.1f} (on {os.cpu_count()} CPUs)."
    header = dict(machine=machine(), quick=quick, threads=threads, total_s=total,
                  note=(note + " " if note else "") + text, repeats=repeats, rounds=rounds)
    write_text_atomic(out / "deepcache.json", json.dumps(dict(header, results=results), indent=1))
    render(out_dir)
    return results


def render(out_dir: str = "experiments/bench"):
    """(Re)write deepcache.md from deepcache.json (e.g. after changing the text), no measurement."""
    out = Path(out_dir)
    data = json.loads((out / "deepcache.json").read_text())
    write_markdown(data["results"], out / "deepcache.md", data["machine"], data["quick"], data["threads"],
                   data["total_s"], data["note"])


def _cli():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="experiments/bench")
    p.add_argument("--quick", action="store_true", help="small batch / few steps (a shared 2-core CPU)")
    p.add_argument("--models", default="fashion_mnist,cifar10")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--branches", default=",".join(map(str, BRANCHES)))
    p.add_argument("--intervals", default=",".join(map(str, INTERVALS)))
    p.add_argument("--size", action="append", default=[], metavar="MODEL=BATCHxSTEPS",
                   help="e.g. --size cifar10=4x20 (repeatable)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds of single-call timings")
    p.add_argument("--compiled-branches", default=None, help="branches to compile (default: all; quick: 3)")
    p.add_argument("--note", default="", help="free text written under the machine line")
    p.add_argument("--render", action="store_true", help="only rewrite deepcache.md from deepcache.json")
    a = p.parse_args()
    if a.render:
        return render(a.out_dir)
    sizes = {}
    for s in a.size:
        name, bs = s.split("=")
        b, n = bs.lower().split("x")
        sizes[name] = (int(b), int(n))
    main(a.out_dir, a.quick, a.models.split(","), a.modes.split(","), [int(v) for v in a.intervals.split(",")],
         [int(v) for v in a.branches.split(",")], sizes, a.repeats, a.device, a.backend, a.note, a.rounds,
         None if a.compiled_branches is None else [int(v) for v in a.compiled_branches.split(",")])


if __name__ == "__main__":
    _cli()
