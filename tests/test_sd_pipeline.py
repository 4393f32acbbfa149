"""Stable-Diffusion-type pipelines: a tiny random pipeline folder written by the repo's own command, loaded by
fewstep (UNet, VAE, CLIP text encoder and tokenizer, scheduler betas), and fewstep's DDIM and DPM-Solver++
with classifier-free guidance reproducing diffusers' StableDiffusionPipeline from the same initial latents,
prompt embeddings and timesteps (final latents and decoded images within 1e-4 relative)."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fewstep.backbones.sd_unet import SDUNetAdapter
from fewstep.config import ConfigError
from fewstep.denoiser import Denoiser
from fewstep.pipelines import load_pipeline, scheduler_betas
from fewstep.samplers.ddim import sample_ddim
from fewstep.samplers.dpmpp import sample_dpmpp
from fewstep.schedule import NoiseSchedule, make_betas, select_timesteps
from fewstep.strategies.guidance import Guidance

torch.set_num_threads(1)
PROMPTS = ["a photo of the cat", "an oil painting of a tree in winter"]
NEGATIVE = "blurry"
SCALE, STEPS = 7.5, 8


def backbone_cfg(path, **kw):
    return OmegaConf.create({"name": "sd_unet", "pretrained": str(path), "dtype": "fp32", "parameterization": "eps",
                             "schedule": {"kind": "scaled_linear", "n": 1000, "beta_start": 0.00085, "beta_end": 0.012},
                             **kw})


@pytest.fixture(scope="module")
def folder(tiny_sd_folder):
    return tiny_sd_folder


@pytest.fixture(scope="module")
def parts(folder):
    unet, pipe = load_pipeline(backbone_cfg(folder))
    return unet.eval(), pipe


@pytest.fixture(scope="module")
def reference(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.sd_scheduler_config = dict(pipe.scheduler.config)    # the folder's (PNDMScheduler), before any swap
    return pipe


def relative_error(x, ref):
    return ((x - ref).abs().max() / ref.abs().max()).item()


def test_folder_loads_with_the_pipeline_schedule(folder, parts, reference):
    unet, pipe = parts
    assert type(unet).__name__ == "UNet2DConditionModel" and pipe.vae_scale_factor == 2
    betas = scheduler_betas(reference.sd_scheduler_config)
    np.testing.assert_allclose(betas, make_betas("scaled_linear", 1000, 0.00085, 0.012), rtol=1e-12)
    ab = NoiseSchedule(betas).alpha_bar
    np.testing.assert_allclose(ab, reference.scheduler.alphas_cumprod.double().numpy(), rtol=2e-6)


@torch.no_grad()
def test_prompt_embeddings_are_the_pipelines(parts, reference):
    _, pipe = parts
    ref_c, ref_u = reference.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[NEGATIVE] * len(PROMPTS))
    assert torch.equal(pipe.encode(PROMPTS), ref_c)
    assert torch.equal(pipe.encode([NEGATIVE]).expand_as(ref_u), ref_u)
    assert not torch.equal(ref_c[0], ref_c[1])


def _fewstep_and_diffusers(parts, reference, scheduler_cls, sampler, **sched_kw):
    unet, pipe = parts
    schedule = NoiseSchedule(scheduler_betas(reference.sd_scheduler_config))
    text, neg = pipe.encode(PROMPTS), pipe.encode([NEGATIVE])
    model = Denoiser(SDUNetAdapter(unet), schedule, guidance=Guidance(SCALE), null_cond={"encoder_hidden_states": neg})
    z = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref_pipe = reference
    ref_pipe.scheduler = scheduler_cls.from_config(reference.sd_scheduler_config, **sched_kw)
    ref_pipe.scheduler.set_timesteps(STEPS)
    ts = ref_pipe.scheduler.timesteps.numpy().astype(np.float64)
    ref = ref_pipe(prompt_embeds=text, negative_prompt_embeds=neg.expand_as(text), latents=z.clone(),
                   num_inference_steps=STEPS, guidance_scale=SCALE, height=16, width=16, output_type="latent").images
    x = sampler(model, z, ts, schedule, extra_args={"encoder_hidden_states": text})
    assert model.nfe == STEPS and model.rows == {"full": 2 * STEPS}
    return x, ref, ts, pipe


@torch.no_grad()
def test_ddim_with_cfg_reproduces_stable_diffusion_pipeline(parts, reference):
    from diffusers import DDIMScheduler

    # fewstep's DDIM ends with the jump to alpha_bar = 1 (set_alpha_to_one=True); SD's stored config says
    # false (a last jump to alpha_bar_0 = 0.99915 instead of 1)
    x, ref, ts, pipe = _fewstep_and_diffusers(parts, reference, DDIMScheduler, sample_ddim, set_alpha_to_one=True)
    # the pipeline's "leading" spacing with steps_offset = 1 is fewstep's leading spacing offset by 1
    assert np.array_equal(ts, select_timesteps(NoiseSchedule(make_betas("scaled_linear", 1000, 0.00085, 0.012)),
                                               STEPS, "leading", offset=1))
    assert relative_error(x, ref) <= 1e-4
    img, img_ref = pipe.decode(x), reference.vae.decode(ref / reference.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert relative_error(img, img_ref) <= 1e-4
    # the guided latents are not the unguided ones (the condition and guidance are used)
    assert (ref - x.new_zeros(())).abs().max() > 0.1


@torch.no_grad()
def test_dpmpp_with_cfg_reproduces_stable_diffusion_pipeline(parts, reference):
    from diffusers import DPMSolverMultistepScheduler

    x, ref, ts, pipe = _fewstep_and_diffusers(parts, reference, DPMSolverMultistepScheduler,
                                              lambda *a, **k: sample_dpmpp(*a, order=2, lower_order_final=True, **k))
    assert ts[0] == 1000 // (STEPS + 1) * STEPS + 1 and ts[-1] == 1000 // (STEPS + 1) + 1   # leading, steps + 1 points
    assert relative_error(x, ref) <= 1e-4
    img, img_ref = pipe.decode(x), reference.vae.decode(ref / reference.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert relative_error(img, img_ref) <= 1e-4


def test_bad_pipeline_folders_are_one_line(folder, tmp_path):
    import shutil

    with pytest.raises(ConfigError, match="not a diffusers pipeline folder"):
        load_pipeline(backbone_cfg(tmp_path))
    with pytest.raises(ConfigError, match="folder not found"):
        load_pipeline(backbone_cfg(tmp_path / "nowhere"))
    for part, msg in (("tokenizer", "has no tokenizer"), ("text_encoder", "has no text_encoder")):
        broken = tmp_path / f"no_{part}"
        shutil.copytree(folder, broken)
        shutil.rmtree(broken / part)
        with pytest.raises(ConfigError, match=msg):
            load_pipeline(backbone_cfg(broken))
    pickled = tmp_path / "pickled"             # weights as a pickle (pytorch_model.bin): refused, never unpickled
    shutil.copytree(folder, pickled)
    from safetensors.torch import load_file

    state = load_file(str(pickled / "text_encoder" / "model.safetensors"))
    (pickled / "text_encoder" / "model.safetensors").unlink()
    torch.save(state, pickled / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="its text_encoder is not a loadable CLIPTextModel"):
        load_pipeline(backbone_cfg(pickled))
    with pytest.raises(ConfigError, match="set backbone.schedule to match"):
        load_pipeline(backbone_cfg(folder, schedule={"kind": "linear", "n": 1000, "beta_start": 1e-4, "beta_end": 0.02}))
    with pytest.raises(ConfigError, match="backbone.parameterization=eps"):
        load_pipeline(backbone_cfg(folder, parameterization="v"))


@torch.no_grad()
def test_half_precision_weights(folder):
    """backbone.dtype=bf16 loads the UNet, VAE and text encoder in bf16; the denoiser's eps stays float32 and
    close to the fp32 one (the sampler's arithmetic is float32)."""
    unet16, pipe16 = load_pipeline(backbone_cfg(folder, dtype="bf16"))
    unet32, pipe32 = load_pipeline(backbone_cfg(folder))
    assert unet16.dtype == pipe16.vae.dtype == pipe16.text_encoder.dtype == torch.bfloat16
    schedule = NoiseSchedule(make_betas("scaled_linear", 1000, 0.00085, 0.012))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = [Denoiser(SDUNetAdapter(u.eval()), schedule)(x, 500.0, encoder_hidden_states=p.encode(PROMPTS))
           for u, p in ((unet16, pipe16), (unet32, pipe32))]
    assert eps[0].dtype == torch.float32 and torch.isfinite(eps[0]).all()
    assert 0 < relative_error(eps[0], eps[1]) < 0.1
    assert pipe16.decode(x).dtype == torch.float32


@torch.no_grad()
def test_diffusers_sampler_with_the_pipelines_scheduler_settings_reproduces_its_ddim(parts, reference):
    """sampler=diffusers sampler.scheduler=DDIMScheduler with the folder's spacing settings (steps_offset 1,
    set_alpha_to_one false, clip_sample false) is the pipeline's own DDIM, final jump to alpha_bar_0 included."""
    from diffusers import DDIMScheduler

    from fewstep.samplers.diffusers_sampler import sample_diffusers

    kw = {"steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}
    x, ref, _, _ = _fewstep_and_diffusers(
        parts, reference, DDIMScheduler,
        lambda model, z, ts, schedule, extra_args: sample_diffusers(model, z, schedule, "DDIMScheduler", STEPS, kw,
                                                                    extra_args=extra_args))
    assert {k: reference.sd_scheduler_config[k] for k in kw} == kw
    assert relative_error(x, ref) <= 1e-4
