"""Benchmark: images per second of the shipped UNet by sample batch size (config key `batch_size`).

Sampling results depend on `batch_size` only through float round-off (sample i always starts from
generator (seed, i); tests/test_run.py bounds the difference), so it is a throughput knob. On a CPU, larger is not faster: each
network call allocates activations that grow with the batch, and once single tensors pass the C
allocator's mmap threshold (glibc: at most 32 MiB) every one of them is mapped, page-faulted in zeroed
and unmapped again on each call. The bench measures what that costs: for each batch size and thread
count, interleaved round by round (fastest round reported: other processes only ever add time),

* images/s through one Denoiser call (what the samplers call), at t = 500;
* user and system CPU time per image and minor page faults per image (getrusage of this process);
* the largest activation a call allocates (the biggest tensor the forward creates, measured).

Then the same measurement in a child process started with glibc's mmap switched off
(MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=4 GiB: large blocks come from the heap and stay there), to
show whether the allocator is what the large batches pay for. (`--no-allocator-check` skips it.)

    python -m fewstep.bench.batch [--batches 32 64 128 250 500] [--threads 1 2] [--images 1000] [--repeats 3]

It writes experiments/bench/batch.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..build import adapt, load_pretrained
from ..config import repo_path
from ..denoiser import Denoiser
from ..fileio import write_text_atomic
from ..schedule import NoiseSchedule
from . import write_report
from .samplers import machine

Variant = Tuple[int, int]          # (threads, batch)
NO_MMAP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(4 * 2 ** 30)}


def largest_activation_bytes(denoiser: Denoiser, x: torch.Tensor) -> int:
    """Bytes of the largest tensor any module of the network returns on input x."""
    sizes = [0]

    def hook(_module, _args, out):
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(o):
                sizes.append(o.numel() * o.element_size())

    handles = [m.register_forward_hook(hook) for m in denoiser.backbone.modules()]
    try:
        denoiser(x, 500)
    finally:
        for h in handles:
            h.remove()
    return max(sizes)


def _usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


@torch.no_grad()
def bench(batches: Sequence[int], threads: Sequence[int], images: int, repeats: int) -> Dict[Variant, dict]:
    unet = load_pretrained(repo_path("checkpoints/fashion_mnist/unet")).eval()
    den = Denoiser(adapt("unet", unet), NoiseSchedule.from_config())
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, 1, 28, 28, generator=gen) for b in batches}
    variants = [(t, b) for t in threads for b in batches]
    rows = {v: {"s_per_image": [], "user": 0.0, "sys": 0.0, "minflt": 0, "n": 0} for v in variants}
    for b in batches:
        den(inputs[b], 500)                                # warm-up
    saved = torch.get_num_threads()
    try:
        for rnd in range(repeats):
            for v in variants[rnd % len(variants):] + variants[:rnd % len(variants)]:   # rotate the order
                t, b = v
                torch.set_num_threads(t)
                calls = max(1, round(images / b))
                u0, s0, f0 = _usage()
                start = time.perf_counter()
                for _ in range(calls):
                    den(inputs[b], 500)
                wall = time.perf_counter() - start
                u1, s1, f1 = _usage()
                r = rows[v]
                r["s_per_image"].append(wall / (calls * b))
                r["user"] += u1 - u0
                r["sys"] += s1 - s0
                r["minflt"] += f1 - f0
                r["n"] += calls * b
    finally:
        torch.set_num_threads(saved)
    for b in batches:
        act = largest_activation_bytes(den, inputs[b])
        for t in threads:
            rows[(t, b)]["act_bytes"] = act
    return rows


def table(rows: Dict[Variant, dict]) -> list:
    threads = sorted({t for t, _ in rows})
    batches = sorted({b for _, b in rows})
    lines = ["| threads | batch | images/s | x | user ms / image | sys ms / image | page faults / image | largest tensor |",
             "|---|---|---|---|---|---|---|---|"]
    for t in threads:
        best = max(1 / min(r["s_per_image"]) for (tt, _), r in rows.items() if tt == t)
        for b in batches:
            r = rows[(t, b)]
            ips = 1 / min(r["s_per_image"])
            lines.append(f"| {t} | {b} | {ips:.1f} | {ips / best:.2f}x | {1e3 * r['user'] / r['n']:.2f} | "
                         f"{1e3 * r['sys'] / r['n']:.2f} | {r['minflt'] / r['n']:.0f} | "
                         f"{r['act_bytes'] / 2 ** 20:.1f} MiB |")
    return lines


def to_markdown(rows: Dict[Variant, dict], images: int, repeats: int, load: tuple, seconds: float,
                no_mmap_rows: Optional[Dict[Variant, dict]] = None) -> str:
    threads = sorted({t for t, _ in rows})
    batches = sorted({b for _, b in rows})
    lines = ["# Sampling throughput by batch size", "",
             f"Machine: {machine()}. 1-min load average at start / end: {load[0]:.1f} / {load[1]:.1f} "
             f"(on {os.cpu_count()} CPUs). Generated by `python -m fewstep.bench.batch --batches "
             f"{' '.join(map(str, batches))} --threads {' '.join(map(str, threads))} "
             f"--images {images} --repeats {repeats}` in {seconds:.0f} s.", "",
             f"Shipped Fashion-MNIST UNet, one Denoiser call at t = 500 per batch; about {images} images per variant "
             f"per round, {repeats} interleaved rounds. *images/s*: fastest round. *x*: images/s over the best batch "
             "size at the same thread count. CPU times and minor page faults are per image, summed over all rounds "
             "(getrusage of the process). *largest tensor*: the biggest output of any module in one call.", "",
             "## Default allocator", ""] + table(rows)
    if no_mmap_rows is not None:
        lines += ["", "## glibc without mmap (" + " ".join(f"{k}={v}" for k, v in NO_MMAP.items()) + ")", "",
                  "The same variants in a child process started with these variables, run before the table above "
                  "(not interleaved with it).", ""] + table(no_mmap_rows)
    return "\n".join(lines + [""])


def _rows_to_json(rows: Dict[Variant, dict]) -> list:
    return [[t, b, r] for (t, b), r in rows.items()]


def _rows_from_json(data: list) -> Dict[Variant, dict]:
    return {(int(t), int(b)): r for t, b, r in data}


def bench_without_mmap(batches, threads, images: int, repeats: int) -> Dict[Variant, dict]:
    """bench() in a child process whose glibc never maps large blocks (NO_MMAP)."""
    with tempfile.TemporaryDirectory(prefix="fewstep-bench-") as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "fewstep.bench.batch", "--rows-json", out, "--images", str(images),
               "--repeats", str(repeats), "--batches", *map(str, batches), "--threads", *map(str, threads)]
        subprocess.run(cmd, env={**os.environ, **NO_MMAP}, check=True)
        with open(out) as f:
            return _rows_from_json(json.load(f))


def main(out_dir: str = "experiments/bench", batches: Sequence[int] = (32, 64, 128, 250, 500),
         threads: Sequence[int] = (1, 2), images: int = 1000, repeats: int = 3,
         allocator_check: bool = True) -> Path:
    batches, threads = [int(b) for b in batches], [int(t) for t in threads]
    if not batches or min(batches) < 1 or not threads or min(threads) < 1 or images < 1 or repeats < 1:
        raise ValueError(f"need batch sizes >= 1, thread counts >= 1, images >= 1 and repeats >= 1 "
                         f"(got batches={batches}, threads={threads}, images={images}, repeats={repeats})")
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    no_mmap = bench_without_mmap(batches, threads, images, repeats) if allocator_check else None
    rows = bench(batches, threads, images, repeats)
    text = to_markdown(rows, images, repeats, (load0, os.getloadavg()[0]), time.perf_counter() - start, no_mmap)
    return write_report(out_dir, "batch.md", text)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="experiments/bench")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 250, 500])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-allocator-check", dest="allocator_check", action="store_false",
                   help="skip the second measurement with glibc's mmap switched off")
    p.add_argument("--rows-json", help=argparse.SUPPRESS)      # child mode: measure, write rows, no markdown
    a = p.parse_args()
    if a.rows_json:
        write_text_atomic(a.rows_json, json.dumps(_rows_to_json(bench(a.batches, a.threads, a.images, a.repeats))))
    else:
        main(a.out_dir, a.batches, a.threads, a.images, a.repeats, a.allocator_check)
