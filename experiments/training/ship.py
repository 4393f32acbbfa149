"""Copy a `task=train` export into checkpoints/ as a shipped model, its weights stored at half precision.

The networks train and sample in float32; only the stored copy is rounded (float16 keeps 11 significant
bits, a relative error of at most 2^-11 per weight), which halves what a model costs in the tree.
`from_pretrained` reads the float16 file into the float32 network, so nothing else changes: every number
reported for a shipped model is measured on the rounded weights it ships with.

    python experiments/training/ship.py SRC DST --backbone uvit [--dtype float16|float32]

SRC: a save_pretrained folder written by task=train (config.json, weights, train_state.json);
DST: the folder to (re)write, atomically. train_state.json is copied with `stored_dtype` and `shipped_from`
added. Prints the largest relative change of any weight tensor.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

DTYPES = ("float16", "bfloat16", "float32")


def ship(src: Path, dst: Path, backbone: str, dtype: str) -> float:
    import torch

    from fewstep.build import load_pretrained
    from fewstep.fileio import atomic_dir, write_json_atomic

    net = load_pretrained(str(src), None, backbone)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net = net.to(getattr(torch, dtype))
    worst = max(((v.float() - before[k]).norm() / before[k].norm().clamp_min(1e-30)).item()
                for k, v in net.state_dict().items() if before[k].is_floating_point())
    info = json.loads((src / "train_state.json").read_text()) if (src / "train_state.json").exists() else {}
    info.update(stored_dtype=dtype, shipped_from=str(src))
    with atomic_dir(dst) as tmp:
        net.save_pretrained(str(tmp), safe_serialization=True)
        write_json_atomic(tmp / "train_state.json", info)
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--backbone", required=True, help="the trainable network: unet, unet_cond, uvit, dit")
    p.add_argument("--dtype", default="float16", choices=DTYPES)
    a = p.parse_args(argv)
    if not (a.src / "config.json").exists():
        print(f"ship.py: error: {a.src}: no config.json (not a save_pretrained folder)", file=sys.stderr)
        return 2
    worst = ship(a.src, a.dst, a.backbone, a.dtype)
    print(f"{a.src} -> {a.dst} ({a.dtype}): largest relative change of a weight tensor {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
