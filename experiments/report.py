"""Turn sweep summaries into the markdown tables of experiments/README.md.

    python experiments/report.py table   multirun/sampler_table --rows sampler_label --cols nfe --value fid
    python experiments/report.py list    multirun/rho_sweep --keys sampler steps rho_bottom fid precision recall
    python experiments/report.py table   multirun/spacing_dpmpp --rows timesteps endpoint --where timesteps=logsnr
    python experiments/report.py fit_rho multirun/rho_vs_steps
    python experiments/report.py nll     multirun/analytic_nll multirun/analytic_nll_dp
    python experiments/report.py plot    multirun/rho_sweep_* --x rho_bottom --y fid --hue sampler nfe --out experiments/figures/rho_sweep.png
    python experiments/report.py fid_diff multirun/a/0_base multirun/a/1_rho09   (runs made with save_features=true)
    python experiments/report.py fid_diff --pairs base1 run1 base2 run2 ...      (each run against its own base)
    python experiments/report.py interaction multirun/f_base multirun/f --factors rho_bottom cache --out f.json
    python experiments/report.py interaction f.json              (the table of a written result, again)
    python experiments/report.py interaction multirun/f_base multirun/f --factors rho_bottom --where cache=none
    python experiments/report.py archive multirun/rho_sweep experiments/data/rho_sweep
    python experiments/report.py frontier experiments/data/frontier_* --out experiments/figures/frontier.png
    python experiments/report.py denoise experiments/data/denoise_loss      (task=denoise_loss sweeps over rho)
    python experiments/report.py skipnorms experiments/data/skip_norms --out f.png  (task=skip_norms: every skip and step)

Every number in experiments/README.md is what one of these commands printed. `archive` copies a sweep's
(or one run's) small result files into a folder to commit under experiments/data/: each job's metrics.json
and .hydra/config.yaml / overrides.yaml (and task=skip_norms' skip_norms.csv) and the summary.csv, job folder names kept; samples, features,
per-image bounds, images and W&B files stay behind. The other commands read such a folder exactly as the
sweep folder it came from (fid_diff and the paired part of nll need the features / per-image files, so
they do not run on an archive).
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def single_runs(d: Path) -> pd.DataFrame | None:
    """Rows of the single runs (no sweep summary) in d/*/ or d itself: metrics.json + .hydra/overrides.yaml."""
    import json

    import yaml

    rows = []
    for f in sorted([*Path(d).glob("*/metrics.json"), *Path(d).glob("metrics.json")]):
        ov = f.parent / ".hydra" / "overrides.yaml"
        rows.append({"job": f.parent.name, "overrides": " ".join(yaml.safe_load(ov.read_text()) or []) if ov.exists() else "",
                     **json.loads(f.read_text())})
    return pd.DataFrame(rows) if rows else None


@functools.lru_cache(maxsize=None)
def _job_config(job_dir: str) -> dict:
    """A job's resolved config (its .hydra/config.yaml), read once; {} if it has none."""
    import yaml

    f = Path(job_dir) / ".hydra" / "config.yaml"
    return (yaml.safe_load(f.read_text()) or {}) if f.exists() else {}


def job_cfg(job_dir, node: str) -> dict:
    """A resolved config node ('sampler', 'skip', ...) of a job, {} if it has none."""
    return _job_config(str(job_dir)).get(node) or {}


def linear_rho(job_dir, key: str):
    """rho_bottom / rho_top of a job's linear Skip-Tuning as an override would read ('1.0'), else None."""
    skip = job_cfg(job_dir, "skip")
    return str(skip[key]) if skip.get("name") == "linear" and key in skip else None


def load(dirs) -> pd.DataFrame:
    frames = []
    for d in dirs:
        found = sorted(Path(d).rglob("summary.csv"))
        for f in found:
            df = pd.read_csv(f)
            df["sweep"] = f.parent.name
            df["job_dir"] = [str(f.parent / str(j)) for j in df["job"]]
            frames.append(df)
        if not found and (df := single_runs(Path(d))) is not None:
            df["job_dir"] = [str(Path(d) / j) if (Path(d) / j).is_dir() else str(d) for j in df["job"]]
            df["sweep"] = Path(d).name
            frames.append(df)
    if not frames:
        raise SystemExit(f"no summary.csv under {' '.join(map(str, dirs))}")
    df = pd.concat(frames, ignore_index=True)
    ov = df.get("overrides", pd.Series([""] * len(df))).fillna("")

    def override(key):
        return ov.map(lambda s: next((o.split("=", 1)[1] for o in s.split() if o.lstrip("+").startswith(key + "=")), None))

    # columns older summaries lack, filled from their overrides: <override key> -> its last part, unless named
    named = {"guidance.interval": "guidance_interval", "sampler.scheduler": "scheduler"}
    for key in ("skip.rho_bottom", "skip.rho_top", "sampler.order", "cache.interval", "cache.schedule",
                "cache.branch", "sampler.var_type", "variance", "sampler.timesteps", "sampler.eta", "sampler.endpoint",
                "skip.name", "sampler.lower_order_final", "guidance.interval", "sampler.scheduler"):
        col = named.get(key, key.split(".")[-1])
        if col not in df.columns:
            df[col] = override(key)
        else:
            df[col] = df[col].where(df[col].notna(), override(key))

    def fill_from_config(col, lookup):
        """Fill the gaps of a column with lookup(job_dir), read from each job's resolved config."""
        df[col] = [v if not pd.isna(v) else lookup(j) for v, j in zip(df[col].astype(object), df["job_dir"])]

    # the time grid of runs made before metrics recorded it
    for col, default in (("timesteps", None), ("endpoint", True)):
        fill_from_config(col, lambda j: job_cfg(j, "sampler").get(col, default))
    # rho of linear Skip-Tuning runs that left it at its default (e.g. the default job)
    for col in ("rho_bottom", "rho_top"):
        fill_from_config(col, lambda j: linear_rho(j, col))
    df["endpoint"] = [v == "True" if isinstance(v, str) else v for v in df["endpoint"]]
    if "sampler" in df.columns:
        parts = [[f"order {o}"] if isinstance(o, str) else [] for o in df["order"]]
        parts = [p + (["lower_order_final=always"] if lof == "always" else []) for p, lof in
                 zip(parts, df["lower_order_final"])]
        df["scheduler"] = [s if not pd.isna(s) else (job_cfg(j, "sampler").get("scheduler") if n == "diffusers" else None)
                           for s, n, j in zip(df["scheduler"].astype(object), df["sampler"], df["job_dir"])]
        # diffusers: the scheduler's name (UniPCMultistepScheduler -> diffusers UniPCMultistep)
        names = [f"diffusers {str(s).removesuffix('Scheduler')}" if n == "diffusers" and isinstance(s, str) else n
                 for n, s in zip(df["sampler"], df["scheduler"])]
        df["sampler_label"] = pd.Series(names, index=df.index) + [f"({', '.join(p)})" if p else "" for p in parts]
    return df


def fmt(v):
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        if np.isnan(v):
            return ""
        if float(v).is_integer() and abs(v) < 1e5:
            return str(int(v))                    # counts (nfe, calls) read from a column with gaps
        # 3 significant digits, trailing zeros kept (77.0, not 77), one decimal from 100 up
        return f"{v:#.3g}" if abs(v) < 100 else f"{v:.1f}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(fmt(v) for v in r.values) + " |")
    return "\n".join(lines)


def fit_rho(df: pd.DataFrame, metric="fid"):
    """Best rho_bottom per NFE M, then the fit rho*(M) = 1 - C / M^alpha (least squares).

    A best value on the edge of the grid run at that M is flagged: the optimum may lie beyond it. The fit
    and when it is refused: rho_law.
    """
    df = df.assign(rho=df["rho_bottom"].astype(float))
    best = df.loc[df.groupby("nfe")[metric].idxmin(), ["nfe", "rho", metric]].sort_values("nfe")
    lo, hi = (df.groupby("nfe")["rho"].agg(["min", "max"])[c] for c in ("min", "max"))
    best["grid"] = [f"{lo[m]:g}..{hi[m]:g}" for m in best["nfe"]]
    best["edge"] = ["lowest tried" if r == lo[m] else "highest tried" if r == hi[m] else "" for m, r in
                    zip(best["nfe"], best["rho"])]
    print(markdown(best.rename(columns={"rho": "best rho_bottom", "grid": "rho_bottom tried",
                                        "edge": "on the grid's edge"})))
    M, r = best["nfe"].to_numpy(float), best["rho"].to_numpy(float)
    law = rho_law(M, r, [grid_width(df.loc[df["nfe"] == m, "rho"], v) for m, v in zip(best["nfe"], r)])
    if isinstance(law, str):
        print(f"\n{law}")
        return
    pm = (lambda v, e: f"{v:.3f} +- {e:.3f}") if law["C_se"] is not None else (lambda v, e: f"{v:.3f}")
    print(f"\nfit rho*(M) = 1 - C / M^alpha: C = {pm(law['C'], law['C_se'])}, "
          f"alpha = {pm(law['alpha'], law['alpha_se'])}"
          f"{'' if law['C_se'] is not None else ' (no uncertainty: two points, or a degenerate fit)'}, "
          f"RMS error = {law['rms']:.3f}, max |error| = {law['max_err']:.3f}")


def grid_width(tried, best: float) -> float:
    """The width of rho values that round to `best` on the grid `tried` (the rho_bottom run at one M, 1
    included): half the gap to each neighbour (the one gap at an edge, doubled). A best rho is known only to
    this resolution, a standard deviation of width / sqrt(12)."""
    g = sorted(set(float(v) for v in tried) | {1.0, float(best)})
    i = g.index(float(best))
    lo = g[i] - g[i - 1] if i > 0 else None
    hi = g[i + 1] - g[i] if i + 1 < len(g) else None
    if lo is None and hi is None:
        return 0.0
    return ((lo if lo is not None else hi) + (hi if hi is not None else lo)) / 2


def rho_law(M, r, width=None):
    """Least-squares fit of rho*(M) = 1 - C / M^alpha to the best rho_bottom r at NFE M: a dict of C, alpha,
    their standard errors (None with two points: no scatter to read them from), RMS and max error; or a
    one-line reason why no fit is possible. width (per M, grid_width): rho* is known only to the grid's
    resolution, so the standard errors are at least those of points with that rounding error (s.d.
    width / sqrt(12)); without it they come from the residuals alone, and three points on one line read as
    exact. The law stays on one side of 1 for every M (C > 0: below, C < 0: above), so it needs every rho* != 1
    on the same side, at two M at least."""
    from scipy.optimize import curve_fit

    M, r = np.asarray(M, float), np.asarray(r, float)
    below = [(int(m), v) for m, v in zip(M, r) if v < 1.0]
    above = [(int(m), v) for m, v in zip(M, r) if v > 1.0]
    say = lambda pts: ", ".join(f"M = {m} ({v:g})" for m, v in pts)  # noqa: E731
    if not below and not above:
        return "best rho_bottom is 1 at every M: Skip-Tuning does not help here, no fit"
    if below and above:
        return (f"best rho_bottom < 1 at {say(below)} but > 1 at {say(above)}: rho*(M) crosses 1, which "
                f"1 - C / M^alpha (one side of 1 for every M) cannot follow, no fit")
    off = below or above
    if len(off) < 2:   # 1 - C / M^alpha through one point off 1 and the rest at 1: alpha -> infinity
        side = "<" if below else ">"
        return (f"best rho_bottom {side} 1 only at {say(off)}, 1 elsewhere: the two-parameter "
                f"fit needs rho* {side} 1 at two M at least, no fit")
    try:
        (C, alpha), cov = curve_fit(lambda m, C, a: 1 - C / m ** a, M, r, p0=(0.5 if below else -0.5, 0.5),
                                    maxfev=10000)
    except RuntimeError as e:
        return f"the fit rho*(M) = 1 - C / M^alpha did not converge ({e})"
    pred = 1 - C / M ** alpha
    se = np.sqrt(np.diag(cov)) if len(M) > 2 and np.all(np.isfinite(cov)) else None
    if se is not None and width is not None:     # the rounding of rho* to the grid as a known error per point
        sd = np.maximum(np.asarray(width, float), 1e-9) / np.sqrt(12)
        law = lambda m, C, a: 1 - C / m ** a  # noqa: E731
        _, cov_q = curve_fit(law, M, r, p0=(C, alpha), sigma=sd, absolute_sigma=True, maxfev=10000)
        se = np.maximum(se, np.sqrt(np.diag(cov_q))) if np.all(np.isfinite(cov_q)) else se
    return {"C": float(C), "alpha": float(alpha), "C_se": None if se is None else float(se[0]),
            "alpha_se": None if se is None else float(se[1]), "rms": float(np.sqrt(np.mean((pred - r) ** 2))),
            "max_err": float(np.max(np.abs(pred - r)))}


def nll_table(dirs):
    """NLL bound rows straight from each job's metrics.json (single runs have no summary.csv); where the jobs
    wrote per-image bounds (nll_bpd.npz), each Analytic-DDPM row also paired against the full DDPM bound."""
    import json

    from fewstep.metrics.nll import PER_POINT_FILE, paired_difference

    print("| sampler | variance | timesteps | K | NLL (bits/dim) | s.e. | test images |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for d in dirs:
        for f in sorted(Path(d).glob("*/metrics.json"), key=lambda f: (f.parent.parent, json.loads(f.read_text())["nll_steps"])):
            m = json.loads(f.read_text())
            ov = (f.parent / ".hydra" / "overrides.yaml").read_text() if (f.parent / ".hydra" / "overrides.yaml").exists() else ""
            traj = "analytic_dp" if "analytic_dp" in ov else "linspace"
            var = "analytic" if m["variance"] == "analytic" else "beta (DDPM)" if "var_type=beta" in ov else "fixed"
            rows.append((var, traj, m["nll_steps"], m["nll_bpd"], m["nll_n"], f.parent / PER_POINT_FILE))
            print(f"| {m['sampler']} | {var} | {traj} | {m['nll_steps']} | {m['nll_bpd']:.3f} | {m['nll_bpd_se']:.3f} | {m['nll_n']} |")
    # the paper's claim: how many steps Analytic-DPM needs to match the full-length DDPM bound
    full = [r for r in rows if r[0] == "beta (DDPM)" and r[1] == "linspace"]
    if full:
        ref = max(full, key=lambda r: r[2])
        print(f"\nDDPM (beta) at K = {ref[2]}: {ref[3]:.3f} bits/dim ({ref[4]} images)")
        for traj in ("linspace", "analytic_dp"):
            cand = sorted(r for r in rows if r[0] == "analytic" and r[1] == traj and r[4] == ref[4] and r[2] < ref[2])
            if cand:
                hit = next((r for r in cand if r[3] <= ref[3]), None)
                print(f"Analytic-DDPM, {traj} steps: " + (f"K = {hit[2]} reaches it ({hit[3]:.3f}), {ref[2] / hit[2]:.0f}x fewer steps"
                      if hit else f"no K up to {cand[-1][2]} reaches it (best {min(r[3] for r in cand):.3f})"))
        paired = [r for r in sorted(rows, key=lambda r: (r[0], r[1], r[2])) if r[0] == "analytic" and r[5].exists()]
        if paired and ref[5].exists():
            pr = np.load(ref[5])
            print(f"\nPaired with DDPM (beta) at K = {ref[2]} image by image (NLL - DDPM's; s.e. of the per-image "
                  "differences):\n")
            print("| variance | timesteps | K | NLL - DDPM's (bits/dim) | paired s.e. | images |")
            print("|---|---|---|---|---|---|")
            for r in paired:
                pa = np.load(r[5])
                d, se, n = paired_difference(pa["index"], pa["bpd"], pr["index"], pr["bpd"])
                print(f"| {r[0]} | {r[1]} | {r[2]} | {d:+.3f} | {se:.3f} | {n} |")


def _features(d: Path):
    from fewstep.tasks.evaluate import FEATURES_FILE

    found = [d / FEATURES_FILE] if (d / FEATURES_FILE).exists() else sorted(d.glob(f"*/{FEATURES_FILE}"))
    if not found:
        raise SystemExit(f"no {FEATURES_FILE} in {d} or its job folders (run with save_features=true)")
    return found


def _load_features(files):
    """-> (the features.npz files loaded, their feature rows as tensors, the reference statistics they share)."""
    import torch

    from fewstep.metrics.fid import RefStats

    runs = [np.load(f) for f in files]
    refs = {str(r["ref_stats"]) for r in runs}
    if len(refs) > 1:
        raise SystemExit(f"the runs were scored against different reference statistics: {', '.join(sorted(refs))}")
    return runs, [torch.from_numpy(r["features"]) for r in runs], RefStats.load(refs.pop())


def fid_diff(dirs, n_boot: int = 200, pairs: bool = False):
    """FIDs of runs made with save_features=true, each against the first (pairs=True: the dirs name one run
    each, taken two at a time, base then run): the difference and its paired bootstrap standard error (the
    runs must share their samples' indices: same seed and n_samples)."""
    import json

    import torch

    from fewstep.metrics.fid import bootstrap_fid_se, paired_fid_difference

    # hundreds of D x D eigendecompositions: on the idle 2-core machine two threads gain nothing at D = 128
    # (classifier features) and 1.2x at D = 2048 (Inception); with the other core busy (a sampling job) their
    # OpenMP barriers turned a 10 s comparison of classifier features into more than 15 minutes
    torch.set_num_threads(1)
    if pairs and len(dirs) % 2:
        raise SystemExit(f"fid_diff --pairs takes base and run folders two at a time; got {len(dirs)} folders")
    files = []
    for d in map(Path, dirs):
        found = _features(d)
        if pairs and len(found) > 1:
            raise SystemExit(f"fid_diff --pairs: {d} holds {len(found)} runs; name one run folder per argument")
        files += found
    runs, feats, ref = _load_features(files)

    def fid_se(i):                              # the run's own recorded fid_se where it has one
        m = files[i].parent / "metrics.json"
        se = json.loads(m.read_text()).get("fid_se") if m.exists() else None
        return se if se is not None else bootstrap_fid_se(feats[i], ref.mu, ref.cov, n_boot)

    if pairs:
        print("| base | FID | run | FID | run - base | paired s.e. |")
        print("|---|---|---|---|---|---|")
        for i in range(0, len(files), 2):
            d, dse = paired_fid_difference(feats[i + 1], feats[i], ref.mu, ref.cov, n_boot)
            print(f"| {files[i].parent.name} | {float(runs[i]['fid']):.2f} | {files[i + 1].parent.name} | "
                  f"{float(runs[i + 1]['fid']):.2f} | {d:+.2f} | {dse:.2f} |")
        return
    print(f"| run | FID | fid_se | FID - FID of {files[0].parent.name} | paired s.e. |")
    print("|---|---|---|---|---|")
    for i, f in enumerate(files):
        d, dse = paired_fid_difference(feats[i], feats[0], ref.mu, ref.cov, n_boot) if i else (0.0, 0.0)
        print(f"| {f.parent.name} | {float(runs[i]['fid']):.2f} | {fid_se(i):.2f} | {d:+.2f} | {dse:.2f} |")


def where(df: pd.DataFrame, conds) -> pd.DataFrame:
    """The rows whose column KEY prints as VALUE, for every KEY=VALUE of conds."""
    for cond in conds:
        key, _, value = cond.partition("=")
        if key not in df.columns:
            raise SystemExit(f"--where {cond}: no column '{key}' (columns: {', '.join(map(str, df.columns))})")
        df = df[df[key].map(lambda v: fmt(v) if isinstance(v, float) else str(v)) == value]
    return df


def interaction(dirs, factors, out=None, n_boot: int = 200, conds=()) -> dict:
    """The interaction of a 2^k factorial of runs made with save_features=true on the same noise.

    The first run of the first folder is the base (every factor off); a factor is on in a run whose column
    differs from the base's. Prints, with standard errors from one bootstrap that resamples the sample indices
    of every run jointly (fid_contrasts): each factor alone minus the base, all on minus the base, and the
    interaction FID(all) - FID(base) - sum_i (FID(i alone) - FID(base)), which is 0 when the effects add up.
    out: also write them as JSON, the small result the claims table reads (the features stay behind).
    conds (--where KEY=VALUE): only these runs, e.g. two factors of a larger factorial with the others off."""
    import torch

    from fewstep.fileio import write_json_atomic
    from fewstep.metrics.fid import fid_contrasts

    torch.set_num_threads(1)                    # as in fid_diff: hundreds of small eigendecompositions
    df = where(load(dirs), conds)
    missing = [f for f in factors if f not in df.columns]
    if missing:
        raise SystemExit(f"interaction: no column {', '.join(missing)} in the runs")
    level = {f: [("none" if pd.isna(v) else fmt(v) if isinstance(v, float) else str(v)) for v in df[f]] for f in factors}
    cells = {}                                  # factors on -> the first run with them (a base duplicate comes later)
    for i in range(len(df)):
        cells.setdefault(tuple(level[f][i] != level[f][0] for f in factors), i)
    k = len(factors)
    want = [(False,) * k] + [tuple(i == j for j in range(k)) for i in range(k)] + [(True,) * k]
    absent = [" + ".join(f for f, on in zip(factors, w) if on) or "none" for w in want if w not in cells]
    if absent:
        raise SystemExit(f"interaction: no run with only {'; '.join(absent)} on")
    rows = [cells[w] for w in want]
    files = [_features(Path(df["job_dir"].iloc[i]))[0] for i in rows]
    runs, feats, ref = _load_features(files)

    # weights over the runs (base, each factor alone, all on): each factor alone, all on, the interaction
    weights = [[-1.0] + [float(i == j) for j in range(k)] + [0.0] for i in range(k)]
    weights += [[-1.0] + [0.0] * k + [1.0], [k - 1.0] + [-1.0] * k + [1.0]]
    contrasts = [list(c) for c in fid_contrasts(feats, weights, ref.mu, ref.cov, n_boot)]
    single = dict(zip(factors, contrasts[:k]))
    result = {"factors": list(factors), "off": {f: level[f][0] for f in factors},
              "on": {f: level[f][rows[1 + i]] for i, f in enumerate(factors)},
              "runs": [Path(df["job_dir"].iloc[i]).name for i in rows], "fid_base": float(runs[0]["fid"]),
              "single": single, "all": contrasts[k], "sum_of_singles": sum(v[0] for v in single.values()),
              "interaction": contrasts[k + 1], "n_samples": int(len(feats[0])), "n_boot": int(n_boot),
              "cells": len(cells)}
    print_interaction(result)
    if out:
        write_json_atomic(Path(out), result)
    return result


def print_interaction(result: dict) -> None:
    """The table of an interaction result (what `interaction` computed, or its JSON read back)."""
    print(f"| on (base FID {result['fid_base']:.2f}, {result['n_samples']} samples) | FID - base | paired s.e. |")
    print("|---|---|---|")
    for f in result["factors"]:                # (a JSON written with sorted keys keeps the order here)
        d, se = result["single"][f]
        print(f"| {f} = {result['on'][f]} | {d:+.2f} | {se:.2f} |")
    print(f"| all {len(result['factors'])} | {result['all'][0]:+.2f} | {result['all'][1]:.2f} |")
    print(f"| all minus the sum of the singles ({result['sum_of_singles']:+.2f}) | {result['interaction'][0]:+.2f} | "
          f"{result['interaction'][1]:.2f} |")


# per job (a folder with metrics.json); skip_norms.csv: task=skip_norms' per-evaluation table (a few KB)
ARCHIVED = ("metrics.json", ".hydra/config.yaml", ".hydra/overrides.yaml", "skip_norms.csv")
ARCHIVE_MAX_BYTES = 256 * 1024    # per file: the result files are KBs; anything larger is not one of them


def archive(src, dest) -> list[Path]:
    """Copy the small result files of the sweep or run folder src into dest (replaced as a whole): each job's
    ARCHIVED files and every summary.csv, at their paths relative to src. Returns the files written."""
    import shutil

    from fewstep.fileio import atomic_dir

    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise SystemExit(f"archive: no folder {src}")
    if dest.resolve() == src.resolve() or src.resolve() in dest.resolve().parents:
        raise SystemExit(f"archive: {dest} lies inside {src}")
    jobs = sorted(f.parent for f in src.rglob("metrics.json") if "wandb" not in f.relative_to(src).parts)
    files = [f for j in jobs for f in (j / a for a in ARCHIVED) if f.is_file()]
    files += sorted(f for f in src.rglob("summary.csv") if "wandb" not in f.relative_to(src).parts)
    if not jobs:
        raise SystemExit(f"archive: no metrics.json in {src} or below")
    big = [f"{f} ({f.stat().st_size // 1024} KB)" for f in files if f.stat().st_size > ARCHIVE_MAX_BYTES]
    if big:
        raise SystemExit(f"archive: larger than {ARCHIVE_MAX_BYTES // 1024} KB, not a small result file: {', '.join(big)}")
    if dest.exists():   # replaced whole (a re-run sweep leaves no stale job behind), but only an earlier archive
        other = [p for p in dest.rglob("*") if p.is_file() and p.name not in {Path(a).name for a in ARCHIVED} | {"summary.csv"}]
        if other:
            raise SystemExit(f"archive: {dest} holds files an archive does not ({other[0]}); not replacing it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(dest) as tmp:
        for f in files:
            (tmp / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, tmp / f.relative_to(src))
    size = sum(f.stat().st_size for f in files)
    print(f"archived {len(jobs)} jobs of {src} to {dest}: {len(files)} files, {size / 1024:.1f} KB "
          f"({size / 1024 / len(jobs):.1f} KB per job)")
    root = str(Path(__file__).resolve().parents[1])
    local = [str(f.relative_to(src)) for f in files if root in f.read_text(errors="replace")]
    if local:
        print(f"note: {len(local)} of them name this machine's folder {root} (e.g. {local[0]})")
    return [dest / f.relative_to(src) for f in files]


def denoise_table(df: pd.DataFrame):
    """task=denoise_loss runs (one per rho): the relative change strategy / plain - 1 of the pixel (eps) and the
    feature denoising loss at each t, in percent with its paired standard error, one column per rho_bottom."""
    import json

    per = {}
    for _, r in df.iterrows():
        m = json.loads((Path(r["job_dir"]) / "metrics.json").read_text())
        if "rows" not in m or len(m.get("variants", [])) < 2:
            continue
        rows, strategy = m["rows"], m["variants"][1]
        label = f"rho_bottom={m['rho_bottom']:g}" if "rho_bottom" in m else strategy
        if any(label in cols for by_t in per.values() for cols in by_t.values()):
            raise SystemExit(f"denoise: two runs are both {label} ({r['job_dir']}); give one folder per setting")
        for t in m["loss_t"]:
            plain, s = rows[f"plain/t{t}"], rows[f"{strategy}/t{t}"]
            for k in ("pixel_eps", "feature"):
                per.setdefault(k, {}).setdefault(t, {})[label] = \
                    f"{100 * s[f'd_{k}'] / plain[k]:+.1f} +- {100 * s[f'd_{k}_se'] / plain[k]:.1f}"
    if not per:
        raise SystemExit("denoise: no task=denoise_loss run with a skip strategy among these folders")
    for k, what in (("pixel_eps", "pixel (eps) loss"), ("feature", "feature loss")):
        t = pd.DataFrame.from_dict(per[k], orient="index").sort_index()
        t = t[sorted(t.columns, key=lambda c: (0, float(c.split("=")[1]), "") if c.startswith("rho_bottom=") else (1, 0.0, c))]
        t.index.name = "t"
        print(f"{what}, % change vs the plain network (paired s.e.):\n")
        print(markdown(t.reset_index()))
        print()


def skip_norm_rows(dirs) -> pd.DataFrame:
    """Every row of the skip_norms.csv files (task=skip_norms) under dirs, with the job's sampler label,
    its NFE and its skip strategy's rho_bottom."""
    frames = []
    for d in dirs:
        for f in sorted(Path(d).rglob("skip_norms.csv")):
            rows = pd.read_csv(f)
            sampler = job_cfg(f.parent, "sampler")
            name = sampler.get("name", "?")
            if name == "diffusers":
                name = sampler.get("scheduler", "diffusers").replace("Scheduler", "").replace("Multistep", "")
            rows["run"] = f"{name} {sampler.get('steps', '?')} steps"
            rows["rho_bottom"] = job_cfg(f.parent, "skip").get("rho_bottom")
            frames.append(rows)
    if not frames:
        raise SystemExit(f"no skip_norms.csv under {' '.join(map(str, dirs))}")
    return pd.concat(frames, ignore_index=True)


def skip_norm_summary(df: pd.DataFrame) -> list:
    """Per run and variant of skip_norm_rows: (run, variant, its rows, the pairs with prop >= 1, the row of the
    largest prop), in the rows' order."""
    return [(run, variant, g, int((g["prop"] >= 1).sum()), g.loc[g["prop"].idxmax()])
            for (run, variant), g in df.groupby(["run", "variant"], sort=False)]


def skip_norm_table(df: pd.DataFrame, out: str | None = None):
    """The skip-norm diagnostic over every (skip, evaluation): prop_i = ||d_i|| / ||u_i|| per run and variant
    (plain network, and the run's skip strategy), how many of the pairs reach prop >= 1, the largest prop and
    where it is (skip depth i, 0 the deepest; sampler step; model timestep t), and the median. With out, a
    heat map per run of the plain network's prop over skips (rows) and evaluations (columns)."""
    print("| run | variant | evaluations | skips | pairs with prop >= 1 | largest prop (skip, step, t) | median prop |")
    print("|---|---|---|---|---|---|---|")
    for run, variant, g, over, top in skip_norm_summary(df):
        label = variant if variant == "plain" else f"{variant} (rho_bottom {fmt(g['rho_bottom'].iloc[0])})"
        print(f"| {run} | {label} | {g['step'].nunique()} | {g['depth'].nunique()} | {over} of {len(g)} | "
              f"{top['prop']:.3f} (i{int(top['depth'])}, step {int(top['sampler_step'])}, t {int(top['t'])}) | "
              f"{g['prop'].median():.3f} |")
    if out is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(df["run"]))
    fig, axes = plt.subplots(1, len(runs), figsize=(2.4 * len(runs) + 1.2, 3.2), squeeze=False, layout="constrained")
    for ax, run in zip(axes[0], runs):
        g = df[(df["run"] == run) & (df["variant"] == "plain")]
        grid = g.pivot_table(index="depth", columns="step", values="prop", aggfunc="first")
        im = ax.imshow(grid.values, vmin=0, vmax=1.2, cmap="coolwarm", aspect="auto", origin="lower")
        ys, xs = np.nonzero(grid.values >= 1)
        ax.scatter(xs, ys, marker="x", color="k", s=14)       # the pairs that break prop < 1
        ax.set_title(run, fontsize=8)
        ax.set_xlabel("network evaluation")
        ax.set_yticks(range(len(grid.index)), [f"i{int(i)}" for i in grid.index], fontsize=7)
    axes[0][0].set_ylabel("skip (i0 deepest)")
    fig.colorbar(im, ax=axes[0].tolist(), label="prop_i = ||d_i|| / ||u_i|| (x: >= 1)")
    _save_figure(fig, out)


def config_label(r) -> str:
    """A row's sampler x strategy combination in a few words: sampler and steps, then every strategy that
    is not the plain network (Skip-Tuning rho, cache, variance, guidance)."""
    def given(key):
        v = r.get(key)
        return v is not None and not (isinstance(v, float) and np.isnan(v)) and str(v) not in ("", "none")

    parts = [f"{r.get('sampler_label', r.get('sampler'))} {int(r['steps'])}" if given("steps") else
             str(r.get("sampler_label", r.get("sampler")))]
    for key in ("rho_bottom", "rho_top"):
        if given(key) and float(r[key]) != 1.0:
            parts.append(f"{key}={float(r[key]):g}")
    if given("skip") and r["skip"] not in ("linear",):
        parts.append(f"skip={r['skip']}")
    if given("cache"):
        parts.append(f"{r['cache']} N={int(float(r['interval']))}" + (f" {r['schedule']}" if given("schedule") else "")
                     if given("interval") else str(r["cache"]))
    if given("variance") and r["variance"] != "fixed":
        parts.append(f"variance={r['variance']}")
    for key, plain in (("timesteps", None), ("var_type", "beta_tilde"), ("eta", None), ("clip_x0", None)):
        v = r.get(key)
        if given(key) and str(v) not in ("False", "0", "0.0", str(plain)) and not (key == "timesteps" and v in
                                                                                  ("linspace", "karras")):
            parts.append(f"{key}={v}" if key != "clip_x0" else "clip_x0")
    if given("guidance_scale") and r.get("guidance") not in (None, "none"):
        parts.append(f"w={float(r['guidance_scale']):g}" +
                     (f" in t {r['guidance_interval']}" if given("guidance_interval") else ""))
    return ", ".join(parts)


def pareto(cost, fid) -> np.ndarray:
    """Mask of the points no other point beats: none with cost <= and fid <, or cost < and fid <=. A point
    without a finite cost is never on the front (and never beats one)."""
    cost, fid = np.asarray(cost, float), np.asarray(fid, float)
    ok = np.isfinite(cost) & np.isfinite(fid)
    c_, f_ = cost[ok], fid[ok]
    return np.array([bool(o) and not np.any(((c_ <= c) & (f_ < f)) | ((c_ < c) & (f_ <= f)))
                     for o, c, f in zip(ok, cost, fid)])


def frontier(df: pd.DataFrame, budgets=(5, 10, 20), out: str | None = None):
    """FID against cost for every sampler x strategy row: cost in full-network-call equivalents of MACs
    (macs_per_sample / macs_full, the MACs of one uncached, unguided call: a guided step counts 2, a cached
    one its fraction) and in wall seconds per sample on the machine that ran it; the Pareto front of each
    marked, then the best row within each budget of full-call equivalents, per group."""
    need = [c for c in ("fid", "macs_per_sample", "macs_full", "wall_time_s", "n_samples") if c not in df.columns]
    if need:
        raise SystemExit(f"frontier needs the columns {', '.join(need)} (metrics=default with the cost count)")
    df = df.dropna(subset=["fid", "macs_per_sample", "macs_full"]).copy()
    df["calls_full"] = df["macs_per_sample"].astype(float) / df["macs_full"].astype(float)
    # FIDs of different feature networks, sample counts (FID's bias falls with n) or models never compare:
    # one front and one set of budgets per group
    model = "model_id" if "model_id" in df.columns else "weights"
    keys = [c for c in ("feature", "n_samples", model) if c in df.columns and df[c].astype(str).nunique() > 1]
    names = {"feature": lambda v: f"{v} features", "n_samples": lambda v: f"{int(float(v))} samples",
             model: lambda v: f"model {v}"}
    df["group"] = [", ".join(names[c](r[c]) for c in keys) for _, r in df.iterrows()]
    if df["group"].nunique() > 1:
        print(f"note: {df['group'].nunique()} groups of rows (by {', '.join(keys)}): one Pareto front and one set "
              f"of budgets each, the largest group first\n")
    df["config"] = [config_label(r) for _, r in df.iterrows()]
    df["s_per_sample"] = df["wall_time_s"].astype(float) / df["n_samples"].astype(float)
    df["front_macs"] = False
    df["front_wall"] = False
    for _, idx in df.groupby("group").groups.items():
        df.loc[idx, "front_macs"] = pareto(df.loc[idx, "calls_full"], df.loc[idx, "fid"])
        df.loc[idx, "front_wall"] = pareto(df.loc[idx, "s_per_sample"], df.loc[idx, "fid"])
    keys = ["config", "fid"] + (["fid_se"] if "fid_se" in df.columns else []) + \
        ["calls_full", "s_per_sample", "front_macs", "front_wall"]
    order = list(df["group"].value_counts().index)     # the largest group (the sweeps' own) first
    for g in order:
        t = df[df["group"] == g].sort_values(["calls_full", "fid"])[keys]
        t = t.assign(front_macs=t["front_macs"].map({True: "yes", False: ""}),
                     front_wall=t["front_wall"].map({True: "yes", False: ""}))
        if len(order) > 1:
            print(f"{g}:\n")
        print(markdown(t.rename(columns={"calls_full": "full-call equivalents", "s_per_sample": "s / sample",
                                         "front_macs": "Pareto (MACs)", "front_wall": "Pareto (wall)"})))
        print()
    rows = []
    for g in order:
        grp = df[df["group"] == g]
        for b in budgets:
            within = grp[grp["calls_full"] <= b + 1e-9]
            row = {"budget (full calls)": f"<= {b}"}
            if within.empty:
                row["best config"] = "(none tried)"
            else:
                r = within.loc[within["fid"].astype(float).idxmin()]
                row.update({"best config": r["config"], "fid": r["fid"], **({"fid_se": r["fid_se"]} if "fid_se" in r else {}),
                            "full-call equivalents": r["calls_full"]})
            if len(order) > 1:
                row["rows of"] = g
            rows.append(row)
    print(markdown(pd.DataFrame(rows)))
    if out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for ax, x, front, label in ((axes[0], "calls_full", "front_macs", "MACs per sample (full-call equivalents)"),
                                    (axes[1], "s_per_sample", "front_wall", "wall seconds per sample")):
            for k, g in enumerate(order):
                grp = df[df["group"] == g]
                name = g or "rows"
                ax.scatter(grp[x], grp["fid"], s=8, color=f"C{k}", alpha=0.35, label=f"{name}: tried")
                f = grp[grp[front]].sort_values(x)
                ax.plot(f[x], f["fid"], "o-", color=f"C{k}", ms=4, label=f"{name}: Pareto front")
                for _, r in f.iterrows():
                    ax.annotate(r["config"], (r[x], r["fid"]), fontsize=5, xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("FID")
            ax.grid(alpha=0.3, which="both")
        axes[0].legend(fontsize=6)
        fig.tight_layout()
        _save_figure(fig, out)


def _save_figure(fig, out):
    import matplotlib.pyplot as plt

    from fewstep.fileio import atomic_path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kind = out.suffix[1:] or plt.rcParams["savefig.format"]   # no suffix: matplotlib's default, appended
    out = out if out.suffix else out.with_name(f"{out.name}.{kind}")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format=kind)
    print(f"wrote {out}")


def plot(df: pd.DataFrame, x: str, y, hue, out: str, logx: bool = False):
    """One line of y against x per value of the hue columns, written to out (png); several y columns give
    one panel each, side by side, sharing x and the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = [y] if isinstance(y, str) else list(y)
    fig, axes = plt.subplots(1, len(ys), figsize=(5 if len(ys) == 1 else 3.2 * len(ys), 3.4), squeeze=False)
    for ax, col in zip(axes[0], ys):
        groups = df.groupby(hue) if hue else [("", df)]
        for key, g in groups:
            g = g.assign(_x=g[x].astype(float)).sort_values("_x")
            label = ", ".join(f"{h}={fmt(k)}" for h, k in zip(hue, key if isinstance(key, tuple) else (key,))) if hue else None
            ax.plot(g["_x"], g[col].astype(float), "o-", ms=3, label=label)
        ax.set_xlabel(x)
        ax.set_ylabel(col)
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    if hue:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["table", "list", "fit_rho", "nll", "plot", "fid_diff", "interaction", "archive",
                                       "frontier", "denoise", "skipnorms"])
    p.add_argument("dirs", nargs="+")
    p.add_argument("--rows", nargs="+", default=["sampler_label"])
    p.add_argument("--cols", nargs="+", default=["nfe"])
    p.add_argument("--value", default="fid")
    p.add_argument("--keys", nargs="*", default=None)
    p.add_argument("--sort", nargs="*", default=None)
    p.add_argument("--x", default="rho_bottom", help="plot: x column")
    p.add_argument("--y", nargs="+", default=["fid"], help="plot: y column(s), one panel each")
    p.add_argument("--hue", nargs="*", default=[], help="plot: one line per value of these columns")
    p.add_argument("--logx", action="store_true")
    p.add_argument("--out", default=None, help="plot, frontier: the png to write; interaction: the JSON to write")
    p.add_argument("--factors", nargs="+", default=["rho_bottom", "cache", "variance", "guidance"],
                   help="interaction: the columns that switch the factors (the first run has them all off)")
    p.add_argument("--pairs", action="store_true", help="fid_diff: folders two at a time, each run against its base")
    p.add_argument("--where", nargs="*", default=[], metavar="KEY=VALUE",
                   help="keep rows whose column KEY prints as VALUE (e.g. timesteps=linspace endpoint=True)")
    a = p.parse_args()
    if a.mode == "nll":
        return nll_table(a.dirs)
    if a.mode == "fid_diff":
        return fid_diff(a.dirs, pairs=a.pairs)
    if a.mode == "interaction":
        if len(a.dirs) == 1 and a.dirs[0].endswith(".json"):     # a result written by --out, printed again
            import json

            return print_interaction(json.loads(Path(a.dirs[0]).read_text()))
        interaction(a.dirs, a.factors, a.out, conds=a.where)
        return
    if a.mode == "skipnorms":
        return skip_norm_table(skip_norm_rows(a.dirs), a.out)
    if a.mode == "archive":
        if len(a.dirs) != 2:
            raise SystemExit("archive takes a sweep (or run) folder and the folder to copy its result files to")
        archive(*a.dirs)
        return
    df = where(load(a.dirs), a.where)
    if a.mode == "table":
        t = df.pivot_table(index=a.rows if len(a.rows) > 1 else a.rows[0], columns=a.cols if len(a.cols) > 1 else a.cols[0],
                           values=a.value, aggfunc="first")

        def label(c):
            parts = c if isinstance(c, tuple) else (c,)
            return " ".join(f"{n}={v:g}" if isinstance(v, (int, float, np.number)) else str(v) for n, v in zip(a.cols, parts))

        t.columns = [label(c) for c in t.columns]
        print(markdown(t.reset_index()))
    elif a.mode == "list":
        if "interval" in df.columns and df["interval"].notna().any():  # DeepCache: speedups vs interval 1
            df["interval"] = pd.to_numeric(df["interval"]).fillna(1).astype(int)   # no cache: every call full
            grp = df.groupby(["sampler", "steps"])     # N = 1 (no cache) is the baseline of both schedules
            df["macs_x"] = grp["macs_per_sample"].transform(lambda c: c[df.loc[c.index, "interval"] == 1].mean()) / df["macs_per_sample"]
            df["wall_x"] = grp["wall_time_s"].transform(lambda c: c[df.loc[c.index, "interval"] == 1].mean()) / df["wall_time_s"]
            df["wall_x/macs_x"] = df["wall_x"] / df["macs_x"]
        keys = a.keys or [c for c in df.columns if c not in ("job", "overrides", "sweep")]
        out = df[[k for k in keys if k in df.columns]]
        if a.sort:
            out = out.sort_values(a.sort)
        print(markdown(out))
    elif a.mode == "denoise":
        denoise_table(df)
    elif a.mode == "frontier":
        frontier(df, out=a.out)
    elif a.mode == "plot":
        if not a.out:
            raise SystemExit("plot needs --out <file.png>")
        plot(df, a.x, a.y, a.hue, a.out, a.logx)
    else:
        fit_rho(df)


if __name__ == "__main__":
    main()
