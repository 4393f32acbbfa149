"""task=evaluate: sample n_samples, measure quality and cost, write grid + metrics.json, log to W&B.

Sample i always starts from (and draws its ancestral noise from) the generator seeded from (seed, i), so
it gets the same noise at any batch_size and on any number of processes, and its output is the same up to
the float round-off of batched kernels (after quantisation to uint8 a rare pixel moves by one level;
tests/test_run.py bounds how many); the metrics agree to that and to the summation order of cross-rank
sums. Wall time covers sampling only (not the metrics); NFE is counted by the denoiser; MACs per sample =
sum over call kinds of calls x MACs of that kind (FlopCounterMode).

Several processes (`trainer=ddp trainer.devices=8 trainer.num_nodes=2`, or `trainer=ddp_cpu
trainer.devices=2` with gloo on CPU) go through `fewstep.parallel.run_parallel` (Lightning Fabric):

* rank r samples the contiguous block `parallel.shard(n_samples, r, world)` of the global indices, each
  sample from its own (seed, i) generator, so the samples are those of one process;
* every rank feeds its samples to its own `Metrics`; `Metrics.compute()` syncs the torchmetrics states
  (FID sums, feature rows in rank = index order), so FID, precision/recall and IS are those of one
  process (up to the float64 summation order of the FID sums);
* NFE, call counts and sampling time are gathered (time = the slowest rank: the parallel wall time);
  the samples that are written (the grid; all of them with save_samples or for the GMM metrics) are
  gathered to rank 0 in index order;
* only global rank 0 goes on: MACs, the NLL bound (metrics=nll, computed by rank 0 alone; each data
  point's bound also goes to nll_bpd.npz), and it is the only process that writes metrics.json, the
  grid and the W&B run.

The single-process path (any trainer with one device and no ddp strategy) runs the same code with
world = 1 and no process group.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..build import build_denoiser, explicit_timesteps, resolve_device, sample_shape
from ..denoiser import check_finite
from ..outputs import RunLogger, output_dir, save_grid, save_points_plot, to_uint8
from ..parallel import SINGLE, Dist, all_gather, gather_by_index, is_multiprocess, run_parallel, shard
from ..samplers import planned_nfe, sample
from ..samplers.noise import SampleNoise

FEATURES_FILE = "features.npz"     # save_features=true: the samples' feature rows (sample order), for paired FIDs


def weights_of(cfg_backbone) -> str:
    """What the network's weights are, for metrics.json: the pretrained folder, or a random initialisation."""
    if cfg_backbone.name == "gmm_exact":
        return "exact"
    return str(cfg_backbone.pretrained or "random (backbone.pretrained=null)")


def conditions(cfg, model, indices, device) -> dict:
    """The extra_args of these samples' model calls: their class labels (`labels`) when the network is
    class-conditional, else none."""
    text = getattr(model.backbone, "conditions", None)
    if text is not None:   # backbone=sd_unet: the embedding of each sample's prompt (dataset=prompts)
        return text(indices, device)
    if model.null_label is None:
        return {}
    from ..conditions import sample_labels

    return {"class_labels": sample_labels(cfg.labels, int(cfg.seed), indices, model.null_label,
                                          device, n_samples=int(cfg.n_samples))}


def build_variance_rule(cfg, model):
    if cfg.variance.name == "fixed":
        return None
    from ..samplers import names_analytic_dp
    from ..strategies.guidance import guidance_key
    from ..strategies.variance import build_variance, model_id

    return build_variance(cfg.variance, model.schedule, model_id(model.backbone), guidance_key(cfg.guidance),
                          all_timesteps=names_analytic_dp(cfg.sampler))


def build_metrics(cfg, device):
    from . import image_metrics

    if cfg.metrics.name == "clip":   # text-to-image: CLIP score of each image against its prompt
        from ..metrics.clip_score import ClipScore

        return ClipScore(cfg.metrics.clip_model, device)
    if image_metrics(cfg):
        from ..config import user_errors
        from ..metrics import Metrics

        with user_errors():  # a missing feature classifier or reference statistics
            return Metrics(cfg.metrics, cfg.dataset, device, keep_rows=bool(cfg.save_features))
    return None


def cost_per_call(cfg, model, shape, device):
    """MACs per sample of each kind of backbone call (full / partial)."""
    from ..metrics.cost import macs_per_call

    x = torch.zeros((1,) + tuple(shape), device=device)
    return macs_per_call(model.backbone, x, cache=model.cache, **conditions(cfg, model, [0], device))


@torch.no_grad()
def generate(cfg, model, variance, shape, device, indices, on_batch=None, progress: bool = False):
    """Sample the given global indices in batches; returns (samples on cpu, stats). on_batch(x, labels): each
    batch of samples with their class labels (None for an unconditional network); progress: a bar over the
    samples (stderr)."""
    from tqdm.auto import tqdm

    from ..pipelines import decode_latents

    out, nfe, calls_total, rows_total, t_sample, t_decode = [], [], {}, {}, 0.0, 0.0
    bs = int(cfg.batch_size)
    ts = explicit_timesteps(cfg.sampler, variance)
    calls = planned_nfe(cfg.sampler, model.schedule, ts)          # what the sampler says it will make
    with tqdm(total=len(indices), desc="sampling", unit="img", dynamic_ncols=True, disable=not progress) as bar:
        for lo in range(0, len(indices), bs):   # the bar ends its line even when sampling stops on an error
            idx = indices[lo: lo + bs]
            noise = SampleNoise(int(cfg.seed), idx, shape, device=device)
            z = noise()
            cond = conditions(cfg, model, idx, device)
            model.reset()
            if model.cache is not None and hasattr(model.cache, "plan"):
                model.cache.plan(calls)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            x = sample(cfg.sampler, model, z, noise, model.schedule, variance=variance, timesteps=ts, extra_args=cond)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_sample += time.perf_counter() - t0
            check_finite(x, f"the final sample (the last step of sampler={cfg.sampler.name}, after {model.nfe} "
                           f"network calls)")
            nfe.append(model.nfe)
            for k, v in model.calls.items():
                calls_total[k] = calls_total.get(k, 0) + v * len(idx)
            for k, v in model.rows.items():
                rows_total[k] = rows_total.get(k, 0) + v * len(idx)
            x, dt = decode_latents(model, x)       # latent pipelines: the VAE's images (timed on their own)
            t_decode += dt
            x = x.float().cpu()
            if on_batch is not None:   # with the batch's class labels, or its prompts (text-to-image)
                text = getattr(model.backbone, "conditions", None)
                on_batch(x, cond.get("class_labels") if text is None else text.prompts_of(idx))
            out.append(x)
            bar.update(len(idx))
    samples = torch.cat(out) if out else torch.empty((0,) + tuple(shape))
    return samples, {"nfe": float(np.mean(nfe)) if nfe else 0.0, "calls": calls_total, "rows": rows_total, "time": t_sample,
                     "nfe_batches": nfe, "decode_time": t_decode}


def print_table(metrics: dict, keys=None):
    keys = keys or [k for k, v in metrics.items() if isinstance(v, (int, float))]
    width = max(len(k) for k in keys)
    print("-" * (width + 16))
    for k in keys:
        v = metrics[k]
        print(f"{k:<{width}}  {v:>12.4g}" if isinstance(v, float) else f"{k:<{width}}  {v:>12}")
    print("-" * (width + 16))


def _combine_stats(stats: list) -> dict:
    """Per-rank generate() stats -> one: NFE averaged over all batches, calls summed, time of the slowest rank."""
    nfe = [v for st in stats for v in st["nfe_batches"]]
    calls, rows = {}, {}
    for st in stats:
        for k, v in st["calls"].items():
            calls[k] = calls.get(k, 0) + v
        for k, v in st["rows"].items():
            rows[k] = rows.get(k, 0) + v
    return {"nfe": float(np.mean(nfe)) if nfe else 0.0, "calls": calls, "rows": rows,
            "time": max(st["time"] for st in stats), "decode_time": max(st["decode_time"] for st in stats)}


def evaluate_rank(dist: Dist, cfg):
    """Everything but the writing, on one rank: sample this rank's shard, update and sync the metrics.

    Returns (result dict, samples to write: the first grid_size, or all with save_samples / GMM) on global
    rank 0 and None on the other ranks. With dist = SINGLE it is the plain single-process evaluation."""
    device = dist.device if dist.world > 1 and dist.device is not None else resolve_device(cfg.device)
    shape = sample_shape(cfg)
    model = build_denoiser(cfg, device)
    from ..identity import model_id

    mid = model_id(model.backbone)
    if cfg.metrics.fid and cfg.metrics.paired_with:   # a base made by another model pairs nothing
        from ..metrics import check_paired_model

        check_paired_model(cfg.metrics, mid)
    variance = build_variance_rule(cfg, model)
    metrics = build_metrics(cfg, device)
    n_total = int(cfg.n_samples)
    indices = shard(n_total, dist.rank, dist.world)
    samples, st = generate(cfg, model, variance, shape, device, indices,
                           on_batch=metrics.update if metrics is not None else None,
                           progress=dist.is_global_zero)
    quality = metrics.compute() if metrics is not None else {}        # collective: states synced across ranks
    st = _combine_stats(all_gather(st, dist))
    gmm = cfg.dataset.name == "gmm"
    keep = n_total if (gmm or cfg.save_samples) else min(n_total, int(cfg.task.grid_size))
    samples = gather_by_index(samples, indices, dist, keep=keep)
    if not dist.is_global_zero:
        return None
    n = n_total
    macs = cost_per_call(cfg, model, shape, device)
    result = {"n_samples": n, "nfe": st["nfe"], "wall_time_s": st["time"], "images_per_s": n / max(st["time"], 1e-9),
              "sampler": cfg.sampler.name, "steps": int(cfg.sampler.steps), "skip": cfg.skip.name,
              "cache": cfg.cache.name, "variance": cfg.variance.name, "device": str(device),
              "weights": weights_of(cfg.backbone), "model_id": mid}
    if getattr(variance, "path", None):                                  # which Gamma made the variances
        from ..metrics.classifier import file_digest

        result["gamma"], result["gamma_sha256"] = str(Path(variance.path).resolve()), file_digest(variance.path)
    if cfg.autocast:
        result["autocast"] = str(cfg.autocast)
    if model.null_label is not None:
        result["labels"] = str(cfg.labels)
        result["guidance"] = cfg.guidance.name
        if cfg.guidance.name != "none":
            result["guidance_scale"] = float(cfg.guidance.scale)
            interval = cfg.guidance.interval
            result["guidance_interval"] = None if interval is None else f"[{interval[0]:g},{interval[1]:g}]"
            result["guidance_rescale"] = float(cfg.guidance.rescale)
    if cfg.sampler.name == "diffusers":                                  # which scheduler drove the network
        result["scheduler"] = str(cfg.sampler.scheduler)
    if cfg.sampler.name in ("ddpm", "ddim"):
        result["clip_x0"] = bool(cfg.sampler.clip_x0)
    if cfg.sampler.name != "diffusers":                                  # the time grid, for the tables
        result["timesteps"] = cfg.sampler.timesteps
        result["endpoint"] = bool(cfg.sampler.endpoint)
    if dist.world > 1:
        result["world_size"] = dist.world
    if macs:
        # every row computed counts: a guided call computes two per sample
        result["macs_per_sample"] = sum(c * macs.get(k, float("nan")) for k, c in st["rows"].items()) / n
        for k, v in macs.items():
            result[f"macs_{k.replace('@', '_')}"] = v
    for k, c in st["calls"].items():
        result[f"calls_{k.replace('@', '_')}"] = c / n
    result.update(quality)
    if getattr(model.backbone, "pipeline", None) is not None:   # latent pipelines: the VAE decode's cost
        from ..pipelines import decode_cost, text_run

        result.update(decode_cost(model.backbone.pipeline, shape, st, n, device), **text_run(cfg))
    arrays = {}                                   # file name -> named arrays, written next to metrics.json
    if cfg.save_features and metrics is not None and metrics.enabled:
        arrays[FEATURES_FILE] = {"features": metrics.fake_features.cpu().numpy().astype(np.float32),
                                 "ref_stats": np.array(str(metrics.ref_path.resolve())), "fid": np.float64(result["fid"])}
    if cfg.metrics.name == "nll":
        from ..metrics.nll import PER_POINT_FILE, evaluate_nll

        scalars, arrays[PER_POINT_FILE] = evaluate_nll(cfg, model, variance)
        result.update(scalars)
    if gmm:
        from ..data import build_mixture
        from ..metrics.gmm_stats import gmm_metrics

        result.update(gmm_metrics(samples, build_mixture(cfg.dataset)))
    return result, samples, arrays


def write_outputs(cfg, out: Path, result: dict, samples: torch.Tensor, arrays: Optional[dict] = None,
                  hashed: Optional[dict] = None) -> dict:
    """The grid (or GMM scatter plot), samples.npz, `arrays` ({file name: {array name: array}}, e.g. the
    per-image NLL), metrics.json (last of the files, atomically, with the config_hash of `hashed`: the
    hashed config taken when the run started, default cfg's now), and only then the logger's run: no logger
    failure can cost the result."""
    from ..outputs import atomic_path, write_result

    out.mkdir(parents=True, exist_ok=True)

    def savez(path, **named):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **named)

    for name, named in (arrays or {}).items():
        savez(out / name, **named)
    images = {}
    if cfg.dataset.name == "gmm":
        if samples.shape[1] == 2:
            from ..data import build_mixture

            reference = build_mixture(cfg.dataset).sample(2000, generator=torch.Generator().manual_seed(0))  # same every run
            images["samples"] = save_points_plot(samples, out / "samples.png", reference=reference)
    else:
        images["samples"] = save_grid(samples[: int(cfg.task.grid_size)], out / "samples.png")
        if cfg.save_samples:
            savez(out / "samples.npz", images=to_uint8(samples).numpy())
    result = write_result(out, hashed if hashed is not None else cfg, result)  # its presence: the run finished
    print_table(result, [k for k in ("nfe", "macs_per_sample", "wall_time_s", "images_per_s", "fid", "fid_se", "precision",
                                     "recall", "inception_score", "class_accuracy", "clip_score", "nll_bpd", "nll_bpd_se", "mean_err", "cov_err", "data_loglik") if k in result])
    print(f"[fewstep] results in {out}")
    logger = RunLogger(cfg)   # after the results: a logger failure is a warning line (outputs.RunLogger)
    try:
        logger.log(result, images)
    finally:
        logger.finish()
    return result


def _plain(cfg):
    """A resolved copy of the config for the spawned ranks (they have no Hydra context to resolve in)."""
    from omegaconf import OmegaConf

    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def _launcher_rank() -> int:
    """The global rank a cluster launcher (torchrun, SLURM, MPI, LSF) gave this process; 0 if none did."""
    import os

    for key in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "JSM_NAMESPACE_RANK"):
        v = os.environ.get(key, "")
        if v.strip().isdigit():
            return int(v)
    return 0


def run(cfg, out=None) -> dict:
    """Evaluate cfg; results go to `out` (default: the Hydra output folder, else the cwd).

    The process that writes the results holds the folder's lock for the whole run (a second one is refused:
    RunFolderBusy, one line, exit 2); with resume=true a metrics.json made by the same config (config_hash)
    is returned as it is, any other is named on one line and the job runs again; a run moves the earlier
    result files aside before it starts (metrics.json -> metrics.json.prev-<time>).

    Returns the metrics (an empty dict in the processes of a multi-process job that are not global rank 0)."""
    from ..run_folder import claim_run_folder

    out = Path(out) if out is not None else output_dir()
    trainer = cfg.trainer
    multi = is_multiprocess(trainer)
    # under a cluster launcher every rank runs this function; only global rank 0 writes (and locks)
    writer = not multi or _launcher_rank() == 0
    with claim_run_folder(cfg, out, writer) as claim:
        if claim.done is not None:
            return claim.done
        if multi:   # trainer.* were validated with the rest of the config (tasks.validate)
            from ..config import ConfigError

            devices, nodes = trainer.devices, int(trainer.num_nodes)
            if isinstance(devices, int) and devices > 0 and int(cfg.n_samples) < devices * nodes:
                raise ConfigError(f"n_samples must be >= the number of processes {devices * nodes} "
                                  f"(got {cfg.n_samples})")
            payload = run_parallel(trainer, evaluate_rank, _plain(cfg))
            if payload is None:
                return {}
        else:
            payload = evaluate_rank(SINGLE, cfg)
        return write_outputs(cfg, out, *payload, hashed=claim.hashed)
