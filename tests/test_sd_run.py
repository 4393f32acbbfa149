"""python run.py backbone=sd_unet dataset=prompts: a run on the repo's tiny random pipeline (decoded grid, the
UNet's and the VAE decode's costs, CLIP score with a tiny local CLIP model), prompts invariant to batching,
and every bad text-to-image input refused in one line before any model is built."""
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, compose_cfg

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folder(tiny_sd_folder):
    return tiny_sd_folder


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("a photo of the cat\n\nan astronaut riding a horse\na red car in the rain\n")
    return p


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from fewstep.metrics.clip_score import write_tiny_clip

    out = tmp_path_factory.mktemp("tiny_clip")
    write_tiny_clip(out)
    return out


def sd_overrides(folder, prompts, *extra):
    return ["backbone=sd_unet", f"backbone.pretrained={folder}", "dataset=prompts", f"dataset.path={prompts}",
            "dataset.image_size=16", "logger=none", "sampler=dpmpp", "sampler.steps=3", *extra]


def test_text_to_image_run(folder, prompts, clip_folder, tmp_path, monkeypatch):
    from fewstep.tasks import dispatch

    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(sd_overrides(folder, prompts, "guidance=cfg", "guidance.scale=7.5", "metrics=clip",
                                   f"metrics.clip_model={clip_folder}", "n_samples=4", "batch_size=3",
                                   "save_samples=true", "cache=deepcache", "cache.interval=2", "cache.branch=1",
                                   "skip.rho_bottom=0.8"))
    r = dispatch(cfg)
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.shape == (4, 3, 16, 16) and images.std() > 0          # VAE-decoded RGB images, not latents
    assert (tmp_path / "samples.png").exists() and (tmp_path / "metrics.json").exists()
    assert r["nfe"] == 3 and r["calls_full"] == 2 and r["calls_partial_1"] == 1
    assert r["macs_partial@1" if "macs_partial@1" in r else "macs_partial_1"] < r["macs_full"]
    assert r["macs_vae_decode_per_image"] > 0 and r["vae_decode_time_s"] > 0
    assert r["macs_per_sample"] == 2 * (2 * r["macs_full"] + r["macs_partial_1"])  # two rows (CFG) per call
    assert r["guidance"] == "cfg" and r["guidance_scale"] == 7.5 and 0 <= r["clip_score"] <= 100


@torch.no_grad()
def test_prompts_and_samples_do_not_depend_on_batching(folder, prompts):
    from fewstep.build import build_denoiser, sample_shape
    from fewstep.samplers import sample
    from fewstep.samplers.noise import SampleNoise
    from fewstep.tasks.evaluate import conditions

    cfg = compose_cfg(sd_overrides(folder, prompts, "guidance=cfg", "guidance.scale=5", "metrics=cost",
                                   "device=cpu"))
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    model = build_denoiser(cfg, torch.device("cpu"))
    text = model.backbone.conditions
    assert text.prompts_of(range(5)) == ["a photo of the cat", "an astronaut riding a horse", "a red car in the rain",
                                         "a photo of the cat", "an astronaut riding a horse"]
    whole = conditions(cfg, model, [0, 1, 2, 3], "cpu")["encoder_hidden_states"]
    parts = [conditions(cfg, model, idx, "cpu")["encoder_hidden_states"] for idx in ([0], [1, 2], [3])]
    assert torch.equal(whole, torch.cat(parts)) and torch.equal(whole[0], whole[3])
    assert not torch.equal(whole[0], whole[1])
    shape = sample_shape(cfg)
    assert shape == (4, 8, 8)

    def run(idx):
        model.reset()
        noise = SampleNoise(0, idx, shape)
        return sample(cfg.sampler, model, noise(), noise, model.schedule, extra_args=conditions(cfg, model, idx, "cpu"))

    together = run([0, 1, 2])
    apart = torch.cat([run([0]), run([1, 2])])
    assert (together - apart).abs().max() <= 1e-5 * together.abs().max()


def _strip(src, dst, part):
    shutil.copytree(src, dst)
    shutil.rmtree(dst / part)
    return dst


def _unconditional_unet_folder(src, dst):
    from diffusers import UNet2DModel

    shutil.copytree(src, dst)
    shutil.rmtree(dst / "unet")
    UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8,
                attention_head_dim=8).save_pretrained(str(dst / "unet"))
    return dst


BAD = [
    ("not_a_pipeline", lambda f, p, t: [f"backbone.pretrained={t}"], "not a diffusers pipeline folder"),
    ("missing_folder", lambda f, p, t: [f"backbone.pretrained={t / 'nowhere'}"], "folder not found"),
    ("no_tokenizer", lambda f, p, t: [f"backbone.pretrained={_strip(f, t / 'x', 'tokenizer')}"], "has no tokenizer"),
    ("no_text_encoder", lambda f, p, t: [f"backbone.pretrained={_strip(f, t / 'x', 'text_encoder')}"],
     "has no text_encoder"),
    ("empty_prompts", lambda f, p, t: [f"dataset.path={(t / 'e.txt').write_text(chr(10)) and t / 'e.txt'}"],
     "holds no prompt"),
    ("no_prompts_file", lambda f, p, t: [f"dataset.path={t / 'none.txt'}"], "no such file"),
    ("prompts_for_unconditional_unet", lambda f, p, t: ["backbone=unet"], "is not a text-conditional UNet"),
    ("unet2dmodel_in_the_pipeline", lambda f, p, t: [f"backbone.pretrained={_unconditional_unet_folder(f, t / 'u')}"],
     "text conditioning needs a UNet2DConditionModel"),
    ("sd_unet_without_folder", lambda f, p, t: ["backbone.pretrained=null"], "need a pipeline folder"),
    ("fid_without_reference", lambda f, p, t: ["metrics=default", "n_samples=20"], "use metrics=clip"),
    ("bad_dtype", lambda f, p, t: ["backbone.dtype=fp8"], "backbone.dtype must be one of"),
    ("hub_id_offline", lambda f, p, t: ["backbone.pretrained=nobody/no-such-pipeline"], "hub id not in the local cache"),
    ("clip_model_absent", lambda f, p, t: ["metrics=clip", f"metrics.clip_model={t / 'clip'}"], "not a CLIP model folder"),
    ("analytic_variance", lambda f, p, t: ["sampler=ddim", "variance=analytic"], "use variance=fixed"),
    ("train_sd_unet", lambda f, p, t: ["task=train"], "task=train does not take backbone=sd_unet"),
    ("gamma_on_prompts", lambda f, p, t: ["task=gamma", "backbone=unet"], "task=gamma needs a dataset of images"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_text_to_image_input_is_one_line_and_exit_2(case, folder, prompts, tmp_path, monkeypatch, capsys,
                                                        request):
    _, extra, words = case
    if case[0] != "clip_model_absent":          # the CLIP folder is checked when the metric is built
        request.getfixturevalue("no_model_building")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = sd_overrides(folder, prompts, "metrics=cost", "n_samples=2", *extra(folder, prompts, tmp_path))
    cfg = compose_cfg(overrides)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    assert_one_line_error(cfg, out, capsys, words)


def test_skip_norms_tune_rho_and_learned_rho_on_sd_unet(folder, prompts, tmp_path, monkeypatch):
    """task=skip_norms and task=tune_rho run on the text-conditional UNet unchanged (with the prompts' embeddings
    and CFG), and the learned rho file drives skip=learned."""
    from fewstep.tasks import dispatch

    base = sd_overrides(folder, prompts, "guidance=cfg", "guidance.scale=7.5", "metrics=cost", "sampler=ddim",
                        "sampler.steps=3", "n_samples=2", "batch_size=2")
    monkeypatch.chdir(tmp_path)
    norms = dispatch(compose_cfg(base + ["task=skip_norms", "skip.rho_bottom=0.7"]))
    assert (tmp_path / "skip_norms.csv").exists() and norms["skip"] == "linear"
    (tmp_path / "t").mkdir()
    monkeypatch.chdir(tmp_path / "t")
    dispatch(compose_cfg(base + ["task=tune_rho", "task.teacher_steps=6", "task.n_train=2", "task.n_val=0",
                                 "task.batch_size=2", "task.max_steps=2", "task.teacher_cache=false",
                                 "task.progress=false"]))
    rho = tmp_path / "t" / "rho.yaml"
    assert rho.exists()
    (tmp_path / "e").mkdir()
    monkeypatch.chdir(tmp_path / "e")
    r = dispatch(compose_cfg(base + ["skip=learned", f"skip.path={rho}"]))
    assert r["skip"] == "learned" and r["nfe"] == 3


@torch.no_grad()
def test_clip_score_is_torchmetrics_clip_score_of_each_image_and_its_prompt(clip_folder):
    """metrics=clip: 100 * mean cos(E_image, E_prompt), clamped at 0 (torchmetrics' CLIPScore), each image scored
    against its own prompt; checked against the CLIP model's own embeddings."""
    from transformers import CLIPModel, CLIPProcessor

    from fewstep.images import to_uint8
    from fewstep.metrics.clip_score import ClipScore

    imgs = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a cat", "the dog", "a tree", "an oil painting", "a red car", "the sea"]
    model, proc = CLIPModel.from_pretrained(str(clip_folder)), CLIPProcessor.from_pretrained(str(clip_folder))
    out = model(**proc(text=prompts, images=list(to_uint8(imgs)), return_tensors="pt", padding=True))
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    keep = [i for i in range(6) if cos[i] > 0]            # a random CLIP: score the pairs it finds alike
    assert keep
    m = ClipScore(clip_folder)
    m.update(imgs[keep[:1]], [prompts[keep[0]]])
    m.update(imgs[keep[1:]], [prompts[i] for i in keep[1:]])
    assert m.compute()["clip_score"] == pytest.approx(100 * cos[keep].mean().item(), rel=1e-4)
