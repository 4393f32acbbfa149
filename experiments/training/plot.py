"""The training curves of the long runs: fast FID (with its standard error) against total training step, one
line per progress log; the class-conditional run also shows its class accuracy. The larger-sample FIDs of
saved exports (archived runs under experiments/data/training_evals/s<total step>_<sampler><NFE>[_n<samples>]/, made by
the command in experiments/training/README.md; uvit_s<step>_... for the U-ViT) are drawn over them, one marker per
model and sampler setting.

    python experiments/training/plot.py     # reads experiments/training/*.csv, writes experiments/figures/training.png
"""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))


def read(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def full_evals() -> dict:
    """{(model, label): [(total step, fid, fid_se, n)]} from the archived larger-sample runs
    (folder [<model>_]s<step>_<label>; no model prefix: the unconditional UNet)."""
    out = {}
    for m in sorted((HERE.parent / "data" / "training_evals").glob("*s*_*/metrics.json")):
        hit = re.fullmatch(r"(?:([a-z]+)_)?s(\d+)_(.+)", m.parent.name)
        if hit:
            r = json.loads(m.read_text())
            key = (hit.group(1) or "unet", hit.group(3))
            out.setdefault(key, []).append((int(hit.group(2)), r["fid"], r.get("fid_se", 0.0), r["n_samples"]))
    return {k: sorted(v) for k, v in out.items()}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fewstep.fileio import atomic_path

    logs = sorted(HERE.glob("*.csv"))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for path in logs:
        rows = read(path)
        step = [int(r["total_step"]) for r in rows]
        fid = [float(r["fid"]) for r in rows]
        se = [float(r["fid_se"]) for r in rows]
        ax.errorbar(step, fid, yerr=se, marker="o", ms=3, capsize=2, label=path.stem)
        acc = [(s, float(r["class_accuracy"])) for s, r in zip(step, rows) if r.get("class_accuracy")]
        if acc:
            ax2.plot(*zip(*acc), marker="o", ms=3, label=path.stem)
        print(f"{path.name}: {len(rows)} rows, total step {step[0]}..{step[-1]}, fast FID {fid[0]:.1f} -> {fid[-1]:.1f}"
              f" (best {min(fid):.1f})" + (f", class accuracy {acc[-1][1]:.3f}" if acc else ""))
    for (model, label), pts in full_evals().items():
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="s", ms=5, capsize=2,
                    ls="--", label=f"{model}, {label}, {pts[0][3]} samples")
        print(f"{'' if model == 'unet' else model + ' '}{label} ({pts[0][3]} samples): "
              + ", ".join(f"step {p[0]}: FID {p[1]:.2f} +- {p[2]:.2f}" for p in pts))
    ax.set_yscale("log")      # the U-ViT starts from random weights (FID ~700), the UNets end near 5-15
    ax.set_xlabel("total training step")
    ax.set_ylabel("FID (classifier features, log scale)")
    ax.legend(fontsize=7)
    ax2.set_xlabel("total training step")
    ax2.set_ylabel("class accuracy of conditional samples")
    ax2.axhline(0.1, color="gray", lw=0.5, ls=":")
    fig.tight_layout()
    out = HERE.parent / "figures" / "training.png"
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    print(f"wrote {out.relative_to(HERE.parents[1])}")


if __name__ == "__main__":
    main()
