"""Latent text-to-image pipelines: a diffusers StableDiffusionPipeline folder as fewstep's parts.

`backbone=sd_unet backbone.pretrained=<folder>` reads the folder that
``StableDiffusionPipeline.save_pretrained`` writes (or ``hf download`` fetches):

    model_index.json
    unet/           UNet2DConditionModel       -> the backbone (backbones/sd_unet.py: SDUNetAdapter)
    vae/            AutoencoderKL              -> `LatentPipeline.decode`: latents / scaling_factor -> images
    text_encoder/   transformers CLIPTextModel -> `LatentPipeline.encode`: prompts -> encoder_hidden_states
    tokenizer/      transformers CLIPTokenizer
    scheduler/      scheduler_config.json      -> the betas (checked against backbone.schedule) and the
                                                  prediction type (checked against backbone.parameterization)

The prompt embeddings are the per-sample condition (``encoder_hidden_states``, (B, 77, D)); the embedding of
the negative prompt ("" by default) is the unconditional row of classifier-free guidance. Both are made
exactly as StableDiffusionPipeline.encode_prompt makes them (padding to the tokenizer's model_max_length,
the text encoder's last hidden state), so fewstep's samplers reproduce the pipeline's (tests/test_sd_pipeline.py).

A hub id instead of a folder is looked up with huggingface_hub: from the local cache when offline
(HF_HUB_OFFLINE=1, as the Makefile sets), downloaded when online; when it is neither it is one line.
`write_tiny_pipeline` writes a tiny randomly initialised pipeline folder (python -m fewstep.tools.tiny_pipeline OUT).
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch

from .config import ConfigError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"backbone.dtype must be one of {', '.join(DTYPES)} (got {name!r})")
    return DTYPES[name]


def _looks_local(name: str) -> bool:
    return str(name).startswith((".", "/", "~")) or str(name).count("/") != 1


def pipeline_folder(pretrained: str) -> Path:
    """The local folder of a pipeline: the path itself, or a hub id's snapshot (cache when offline)."""
    path = Path(os.path.expanduser(str(pretrained)))
    if path.exists() or _looks_local(str(pretrained)):
        if not path.is_dir():
            raise ConfigError(f"backbone.pretrained={pretrained}: folder not found")
        return path
    try:
        from huggingface_hub import snapshot_download

        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        # the five parts' configs, tokenizer files and safetensors weights only (no pickled .bin duplicates)
        patterns = ["model_index.json"] + [f"{c}/*.{ext}" for c in COMPONENTS for ext in ("json", "txt", "safetensors")]
        return Path(snapshot_download(str(pretrained), local_files_only=offline, allow_patterns=patterns))
    except Exception:
        raise ConfigError(f"backbone.pretrained={pretrained}: hub id not in the local cache and not reachable (offline: "
                          f"HF_HUB_OFFLINE=1); download it where there is internet (hf download "
                          f"{pretrained}) and pass backbone.pretrained=/local/folder") from None


def check_pipeline_folder(path: Path, pretrained: str) -> None:
    """One-line ConfigError unless `path` holds a StableDiffusionPipeline's five components."""
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"backbone.pretrained={pretrained}: not a diffusers pipeline folder (no model_index.json); "
                          f"backbone=sd_unet takes a StableDiffusionPipeline.save_pretrained folder")
    need = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
            "scheduler": "scheduler_config.json"}
    for comp, f in need.items():
        if not (path / comp / f).is_file():
            raise ConfigError(f"backbone.pretrained={pretrained}: the pipeline has no {comp} ({comp}/{f} missing)")
    if not any((path / "tokenizer" / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"backbone.pretrained={pretrained}: the pipeline has no tokenizer "
                          f"(tokenizer/vocab.json or tokenizer/tokenizer.json missing)")


def read_component_config(pretrained: str, component: str) -> dict:
    """A component's config.json (scheduler: scheduler_config.json) without loading anything heavy."""
    path = pipeline_folder(pretrained)
    check_pipeline_folder(path, pretrained)
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((path / component / name).read_text())


# ---------------------------------------------------------------------------- the schedule
def scheduler_betas(conf: dict) -> np.ndarray:
    """The betas of a diffusers scheduler config (float64), as its schedulers make them: trained_betas,
    or linear / scaled_linear (linear in sqrt(beta)) / squaredcos_cap_v2 (cosine)."""
    from .schedule import make_betas

    n = int(conf.get("num_train_timesteps", 1000))
    if conf.get("trained_betas") is not None:
        return np.asarray(conf["trained_betas"], dtype=np.float64)
    kind = conf.get("beta_schedule", "linear")
    if kind == "squaredcos_cap_v2":
        kind = "cosine"
    if kind not in ("linear", "scaled_linear", "cosine"):
        raise ConfigError(f"the pipeline's scheduler has beta_schedule={kind}, which fewstep does not define")
    return make_betas(kind, n, float(conf.get("beta_start", 1e-4)), float(conf.get("beta_end", 2e-2)))


def check_scheduler(conf: dict, cfg_backbone, pretrained: str) -> None:
    """The pipeline's scheduler must define the configured schedule and parameterization (one line otherwise)."""
    from .schedule import make_betas

    s = cfg_backbone.schedule
    mine = make_betas(str(s.kind), int(s.n), float(s.beta_start), float(s.beta_end))
    theirs = scheduler_betas(conf)
    if mine.shape != theirs.shape or not np.allclose(mine, theirs, rtol=1e-6, atol=0):
        raise ConfigError(f"backbone.pretrained={pretrained}: its scheduler's betas ({conf.get('beta_schedule')}, "
                          f"{conf.get('beta_start')}..{conf.get('beta_end')}, {len(theirs)} steps) are not "
                          f"backbone.schedule ({s.kind}, {s.beta_start}..{s.beta_end}, {s.n}): set backbone.schedule to match")
    pred = PREDICTION.get(conf.get("prediction_type", "epsilon"))
    if pred != cfg_backbone.parameterization:
        raise ConfigError(f"backbone.pretrained={pretrained}: its scheduler's prediction_type is "
                          f"{conf.get('prediction_type', 'epsilon')}: set backbone.parameterization={pred}")


# ---------------------------------------------------------------------------- text and latents
@dataclass
class LatentPipeline:
    """The parts of a latent text-to-image pipeline around the UNet: prompt encoding and VAE decoding."""

    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device):
        self.text_encoder.to(device)
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], device=None) -> torch.Tensor:
        """Prompt embeddings (N, model_max_length, D) as StableDiffusionPipeline.encode_prompt makes them."""
        device = device or self.text_encoder.device
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").attention_mask.to(device)
        return self.text_encoder(ids, attention_mask=mask)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (float32): vae.decode(latents / scaling_factor), clamped."""
        vae = self.vae
        if vae.device != latents.device:   # the run's device (the pipeline loads on the CPU)
            vae.to(latents.device)
        z = latents.to(dtype=vae.dtype) / self.scaling_factor
        return vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)


def load_pipeline(cfg_backbone, device="cpu"):
    """(UNet2DConditionModel, LatentPipeline) from backbone.pretrained, in backbone.dtype, checked
    against backbone.schedule / parameterization. Any unreadable part is one ConfigError line."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pretrained = str(cfg_backbone.pretrained)
    path = pipeline_folder(pretrained)
    check_pipeline_folder(path, pretrained)
    check_scheduler(json.loads((path / "scheduler" / "scheduler_config.json").read_text()), cfg_backbone, pretrained)
    dtype = torch_dtype(str(cfg_backbone.dtype))
    parts = {}
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel),
                      ("tokenizer", CLIPTokenizer)):
        try:
            # weights from safetensors only: a pickle (pytorch_model.bin) in a user's folder is never unpickled
            kw = {} if name == "tokenizer" else {"torch_dtype": dtype, "use_safetensors": True}
            if name in ("unet", "vae") and not importlib.util.find_spec("accelerate"):
                kw["low_cpu_mem_usage"] = False   # diffusers only warns and falls back without accelerate
            parts[name] = cls.from_pretrained(str(path), subfolder=name, local_files_only=True, **kw)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"backbone.pretrained={pretrained}: its {name} is not a loadable {cls.__name__} "
                              f"({type(e).__name__}: {first[:160]})") from None
    if not getattr(parts["unet"].config, "cross_attention_dim", None):
        raise ConfigError(f"backbone.pretrained={pretrained}: its UNet has no cross-attention: it cannot take "
                          f"text conditioning")
    text_dim = int(parts["text_encoder"].config.hidden_size)
    if int(parts["unet"].config.cross_attention_dim) != text_dim:
        raise ConfigError(f"backbone.pretrained={pretrained}: the UNet's cross_attention_dim "
                          f"{parts['unet'].config.cross_attention_dim} is not the text encoder's width {text_dim}")
    pipe = LatentPipeline(parts["text_encoder"].eval(), parts["tokenizer"], parts["vae"].eval()).to(device)
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    return parts["unet"], pipe


# ---------------------------------------------------------------------------- a tiny random pipeline
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
# Stable Diffusion 1.x's scheduler_config.json also stores clip_sample=false (for DDIMScheduler.from_config)
SD_SCHEDULER_EXTRA = dict(clip_sample=False)


def tiny_tokenizer(folder: Path):
    """A CLIPTokenizer over a tiny byte-level BPE vocabulary (every byte, with and without the end-of-word
    mark, plus a few merges), written to vocab.json / merges.txt in `folder` and read back."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    merges = ["t h", "th e</w>", "a n", "o n</w>", "i n", "e r</w>"]
    vocab = {}
    for tok in chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(tok, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # the two files positionally: transformers 4's (vocab_file, merges_file) and 5's (vocab, merges) alike
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    return tok


TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def write_tiny_pipeline(out, seed: int = 0):
    """A tiny randomly initialised StableDiffusionPipeline folder (about 1 MB): UNet2DConditionModel of
    TINY_UNET, a 2-level AutoencoderKL (latents 4 x 8 x 8 for 16 x 16 images), a 2-layer CLIPTextModel of
    width 32, a CLIPTokenizer over a byte-level vocabulary, and Stable Diffusion's scheduler config
    (PNDMScheduler, scaled_linear 0.00085..0.012). Nothing downloads. Returns the pipeline."""
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    with torch.no_grad():   # diffusers zero-initialises its output convolutions: make every layer matter
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=PNDMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out))
    sched = out / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), **SD_SCHEDULER_EXTRA}, indent=2) + "\n")
    return pipe


# ---------------------------------------------------------------------------- fewstep's parts from the config
class TextConditions:
    """The per-sample condition of a text-to-image run: the embedding of prompt i mod P for sample i
    (data/prompts.py), computed once per distinct prompt; and the negative prompt's embedding, the
    unconditional row of guidance."""

    def __init__(self, pipe: LatentPipeline, prompts: Sequence[str], negative_prompt: str):
        self.prompts = list(prompts)
        self.embeds = pipe.encode(self.prompts)                    # (P, L, D)
        self.negative = pipe.encode([str(negative_prompt)])        # (1, L, D)

    def __call__(self, indices: Sequence[int], device="cpu", dtype=None) -> dict:
        from .data.prompts import prompt_indices

        rows = torch.tensor(prompt_indices(indices, len(self.prompts)), dtype=torch.long)
        e = self.embeds[rows].to(device=device)
        return {"encoder_hidden_states": e if dtype is None else e.to(dtype)}

    def prompts_of(self, indices: Sequence[int]) -> List[str]:
        from .data.prompts import prompt_indices

        return [self.prompts[j] for j in prompt_indices(indices, len(self.prompts))]


def build_sd_backbone(cfg):
    """backbone=sd_unet with dataset=prompts -> (SDUNetAdapter, NoiseSchedule). The adapter carries the
    pipeline's other parts for the task: `pipeline` (VAE decode), `conditions` (TextConditions) and
    `null_cond` (the negative prompt embedding: guidance's unconditional row)."""
    from .backbones.sd_unet import SDUNetAdapter
    from .build import build_schedule
    from .data.prompts import read_prompts

    unet, pipe = load_pipeline(cfg.backbone)
    adapter = SDUNetAdapter(unet.eval())
    conds = TextConditions(pipe, read_prompts(cfg.dataset), cfg.dataset.negative_prompt)
    adapter.pipeline, adapter.conditions = pipe, conds
    adapter.null_cond = {"encoder_hidden_states": conds.negative}
    return adapter, build_schedule(cfg.backbone.schedule)


def latent_shape(cfg) -> tuple:
    """(latent channels, image_size / f, image_size / f) for dataset.image_size pixels, f the VAE's factor,
    read from the pipeline folder's configs (nothing loaded)."""
    unet = read_component_config(str(cfg.backbone.pretrained), "unet")
    vae = read_component_config(str(cfg.backbone.pretrained), "vae")
    f = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    size = int(cfg.dataset.image_size)
    if size % f:
        raise ConfigError(f"dataset.image_size={size} must be a multiple of the VAE's factor {f}")
    return (int(unet.get("in_channels", 4)), size // f, size // f)


def validate_text_cfg(cfg) -> None:
    """One-line ConfigError for a text-to-image config that cannot run (from the config and the folder's
    JSON files alone): text conditioning of an unconditional backbone, sd_unet without prompts or without
    a pipeline folder, a folder that is not a pipeline or lacks a part, an empty prompts file, a bad dtype,
    feature metrics (FID) without reference images."""
    from .data.prompts import read_prompts

    text_data, sd = cfg.dataset.name == "prompts", cfg.backbone.name == "sd_unet"
    if text_data and not sd:
        raise ConfigError(f"dataset=prompts conditions on text: backbone={cfg.backbone.name} is not a "
                          f"text-conditional UNet (use backbone=sd_unet with a Stable Diffusion pipeline folder)")
    if sd and not text_data:
        raise ConfigError(f"backbone=sd_unet is text-conditional: it samples dataset=prompts (got dataset={cfg.dataset.name})")
    if not sd:
        return
    torch_dtype(str(cfg.backbone.dtype))
    if not cfg.backbone.pretrained:
        raise ConfigError("backbone=sd_unet samples need a pipeline folder (UNet, VAE, text encoder): set "
                          "backbone.pretrained=<folder> (a tiny random one: python -m fewstep.tools.tiny_pipeline OUT)")
    unet = read_component_config(str(cfg.backbone.pretrained), "unet")
    cls = unet.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel" or not unet.get("cross_attention_dim"):
        raise ConfigError(f"backbone.pretrained={cfg.backbone.pretrained}: its unet is a {cls} without cross-attention: "
                          f"text conditioning needs a UNet2DConditionModel")
    read_prompts(cfg.dataset)
    latent_shape(cfg)
    if cfg.variance.name != "fixed":
        raise ConfigError(f"variance={cfg.variance.name} needs Gamma estimated over data images (task=gamma), which "
                          f"dataset=prompts has none of: use variance=fixed")
    if cfg.metrics.fid:
        raise ConfigError(f"metrics={cfg.metrics.name} compares with reference images, which dataset=prompts has "
                          f"none of: use metrics=clip (CLIP score) or metrics=cost")


def decode_latents(model, x: torch.Tensor):
    """(images, seconds): the VAE decode of a latent pipeline's samples (backbone=sd_unet), timed on its own;
    (x, 0.0) for a pixel-space backbone."""
    import time

    pipe = getattr(model.backbone, "pipeline", None)
    if pipe is None:
        return x, 0.0
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    images = pipe.decode(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return images, time.perf_counter() - t0


def decode_cost(pipe: LatentPipeline, latent: tuple, stats: dict, n: int, device) -> dict:
    """The VAE decode's cost beside the UNet's: MACs per image (FlopCounterMode on one latent), its wall
    time and images/s, and images/s of sampling and decoding together."""
    from .metrics.cost import count_macs

    z = torch.zeros((1,) + tuple(latent), device=pipe.vae.device, dtype=pipe.vae.dtype)
    t = max(float(stats["decode_time"]), 1e-9)
    return {"macs_vae_decode_per_image": float(count_macs(pipe.vae.decode, z)),
            "vae_decode_time_s": float(stats["decode_time"]), "vae_decode_images_per_s": n / t,
            "images_per_s_with_decode": n / max(float(stats["time"]) + float(stats["decode_time"]), 1e-9)}


def text_run(cfg) -> dict:
    """What a text-to-image run was conditioned and guided with, for metrics.json."""
    out = {"prompts": str(cfg.dataset.path), "negative_prompt": str(cfg.dataset.negative_prompt),
           "dtype": str(cfg.backbone.dtype), "guidance": str(cfg.guidance.name)}
    if cfg.guidance.name != "none":
        out["guidance_scale"] = float(cfg.guidance.scale)
    return out


def check_text_task(cfg) -> None:
    """One-line ConfigError for a task other than the sampling ones (evaluate, skip_norms, tune_rho) on a
    text-to-image config: a pipeline folder is loaded, never trained, and a prompt file has no images."""
    if cfg.backbone.name == "sd_unet":
        raise ConfigError(f"task={cfg.task.name} does not take backbone=sd_unet (a pretrained pipeline folder: it "
                          f"samples with task=evaluate, skip_norms or tune_rho)")
    if cfg.dataset.name == "prompts":
        raise ConfigError(f"task={cfg.task.name} needs a dataset of images; dataset=prompts holds text prompts (for "
                          f"task=evaluate, skip_norms or tune_rho with backbone=sd_unet)")
