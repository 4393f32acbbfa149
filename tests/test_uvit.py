"""backbone=uvit: the U-ViT network, its adapter (skip hooks, partial forwards) and the strategies on it."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose_cfg
from fewstep.config import group
from fewstep.backbones.uvit import UViT, UViTAdapter, batch_timesteps
from fewstep.denoiser import Denoiser
from fewstep.schedule import NoiseSchedule
from fewstep.strategies.cache import DeepCache, build_cache
from fewstep.strategies.skip import ScaleSkips, build_skip

TINY = dict(sample_size=8, in_channels=1, out_channels=1, patch_size=2, embed_dim=32, depth=7, num_heads=4)
# the same tiny U-ViT from the command line / compose
TINY_UVIT_OVERRIDES = ["backbone=uvit", "backbone.pretrained=null", "dataset=digits", "backbone.config.embed_dim=32", "metrics=cost"]


def make_uvit(seed=0, **overrides):
    torch.manual_seed(seed)
    return UViT(**{**TINY, **overrides}).eval()


@pytest.fixture(scope="module")
def uvit():
    return make_uvit()


@pytest.fixture(scope="module")
def adapter(uvit):
    return UViTAdapter(uvit)


def _x(seed, n=3, c=1, s=8):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed))


def _t(*values):
    return torch.tensor(values, dtype=torch.float32)


def in_blocks(uvit, x, t, n=None, class_labels=None):
    """Tokens, then the first n in blocks (all when None), by hand: (h, [h_0 .. h_{n-1}])."""
    h = uvit.tokens(x, t, class_labels)
    hs = []
    for blk in uvit.in_blocks[:n]:
        h = blk(h)
        hs.append(h)
    return h, hs


def hand_run(uvit, x, t, rho=None, class_labels=None):
    """U-ViT written out block by block, skip m scaled by rho[depth k - m]: the reference of the adapter walk."""
    h, hs = in_blocks(uvit, x, t, class_labels=class_labels)
    h = uvit.mid_block(h)
    k = len(hs) - 1
    for i, blk in enumerate(uvit.out_blocks):
        d = hs[k - i]
        h = blk(h, d if rho is None else d * rho[i])
    return uvit.head(h)


# ---------------------------------------------------------------------------- the network
@pytest.mark.parametrize("overrides", [{}, dict(conv=False, mlp_time_embed=True, qkv_bias=True),
                                       dict(num_classes=10, in_channels=2, out_channels=2, patch_size=4, depth=4)])
def test_adapter_equals_uvit_forward(overrides):
    net = make_uvit(**overrides)
    a = UViTAdapter(net)
    c = net.config.in_channels
    x = _x(0, c=c)
    y = torch.tensor([1, 7, 3]) if net.config.num_classes else None
    assert a.num_skips == net.config.depth // 2 and [s.depth for s in a.skips] == list(range(a.num_skips))
    with torch.no_grad():
        for t in (_t(1.0, 250.5, 999.0), torch.tensor(17)):
            ref = net(x, t, class_labels=y).sample
            assert ref.shape == x.shape
            assert torch.equal(a(x, t, class_labels=y), ref)
            assert torch.equal(hand_run(net, x, batch_timesteps(x, t), class_labels=y), ref)
        for m in range(a.num_skips):  # with a fresh cache the partial forward is the full one
            full, cache = a.forward_full(x, t, m, class_labels=y)
            assert torch.equal(full, ref) and torch.equal(a.forward_partial(x, t, cache, m, class_labels=y), ref)


def test_time_token_is_the_sinusoidal_embedding(uvit):
    """Token 0 minus its position embedding = [cos(t f_j), sin(t f_j)], f_j = 10000^(-j / (D/2))."""
    t = _t(0.0, 3.0, 999.0)
    tok = uvit.tokens(_x(0), t)[:, 0] - uvit.pos_embed[0, 0]
    half = uvit.config.embed_dim // 2
    f = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    torch.testing.assert_close(tok, torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], 1))


def test_head_unpatchifies_the_patch_layout():
    """With norm, projection and conv removed the head inverts the patchify of the U-ViT code,
    B C (h p1) (w p2) -> B (h w) (p1 p2 C): token (h, w) holds its p x p patch, channel fastest."""
    net = make_uvit(in_channels=3, out_channels=3, patch_size=2, embed_dim=12, num_heads=3)
    net.norm, net.decoder_pred, net.final_layer = torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity()
    x = _x(1, n=2, c=3)
    g, p = 4, 2
    tokens = x.reshape(2, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 3)
    extra = torch.randn(2, net.extras, 12)
    assert torch.equal(net.head(torch.cat([extra, tokens], 1)), x)


@pytest.mark.parametrize("kwargs,match", [(dict(patch_size=3), "patch_size=3 must divide the image size 8"),
                                          (dict(num_heads=5), "multiple of num_heads=5"),
                                          (dict(depth=1), "depth=1 must be >= 2")])
def test_impossible_shapes_fail_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UViT(**{**TINY, **kwargs})


# ---------------------------------------------------------------------------- skips
def test_hooks_see_the_long_skips_deepest_first(uvit, adapter):
    x, t = _x(2), _t(600, 600, 600)
    seen = []
    adapter.skip_hooks = [lambda i, d, u, tt: (seen.append((i, d)), (d, u))[1]]
    try:
        with torch.no_grad():
            adapter(x, t)
            _, hs = in_blocks(uvit, x, t)
    finally:
        adapter.skip_hooks = []
    k = adapter.num_skips - 1
    assert [i for i, _ in seen] == list(range(k + 1))
    assert all(torch.equal(d, hs[k - i]) for i, d in seen)


def test_skip_tuning_scales_the_long_skips(uvit, adapter):
    x, t = _x(3), _t(900, 400, 50)
    hooks = build_skip(group("skip", "linear", rho_top=1.0, rho_bottom=0.4), adapter)
    rho = hooks[0].scales
    assert rho == pytest.approx([0.4, 0.7, 1.0])   # k = 2: rho_i = 0.4 + i (1 - 0.4) / 2, i = 0 deepest
    assert build_skip(group("skip", "linear", rho_bottom=1.0), adapter) == []
    adapter.skip_hooks = hooks
    try:
        with torch.no_grad():
            out = adapter(x, t)
            ref = hand_run(uvit, x, t, rho)
            # a window acts per sample: outside [300, 1000] the sample is the plain network's
            adapter.skip_hooks = [ScaleSkips(rho, t_range=[300, 1000])]
            win = adapter(x, t)
    finally:
        adapter.skip_hooks = []
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert (out - uvit(x, t).sample).abs().max() > 1e-3
    with torch.no_grad():
        plain = uvit(x, t).sample
    torch.testing.assert_close(win[:2], out[:2], atol=1e-6, rtol=0)
    assert torch.equal(win[2], plain[2])


def test_freeu_is_refused_on_token_skips(adapter):
    with pytest.raises(ValueError, match="skip=freeu acts on the feature maps of a UNet decoder.*use skip=linear"):
        build_skip(group("skip", "freeu", b1=1.2), adapter)


def test_skip_norms_on_uvit(adapter):
    from fewstep.tasks.skip_norms import measure_skip_norms

    x0 = _x(4)

    def sample_fn(callback):   # no sampler: no step labels
        x = x0.clone()
        for t in (800.0, 200.0):
            x = x - 0.1 * adapter(x, torch.full((3,), t))
        return x

    rows = measure_skip_norms(adapter, sample_fn, {"plain": [], "linear": build_skip(
        group("skip", "linear", rho_bottom=0.5), adapter)})
    p = {(r["variant"], r["step"], r["depth"]): r["prop"] for r in rows}
    assert len(rows) == 2 * 2 * adapter.num_skips and all(r["level"] == 0 for r in rows)
    assert p[("linear", 0, 0)] == pytest.approx(0.5 * p[("plain", 0, 0)], rel=1e-6)


# ---------------------------------------------------------------------------- DeepCache
@pytest.mark.parametrize("m", [0, 1, 2])
def test_partial_step_equals_hand_run_of_the_blocks(uvit, adapter, m):
    x0, x1, t0, t1 = _x(5), _x(6), _t(700, 700, 700), _t(650, 650, 650)
    cache = DeepCache(interval=2, branch=m, num_skips=adapter.num_skips)
    with torch.no_grad():
        out0, kind0 = cache(adapter, x0, t0)
        out1, kind1 = cache(adapter, x1, t1)
        # the cache: the token state entering out block k - m at (x0, t0)
        k = adapter.num_skips - 1
        h, hs0 = in_blocks(uvit, x0, t0)
        h = uvit.mid_block(h)
        for i in range(k - m):
            h = uvit.out_blocks[i](h, hs0[k - i])
        # the partial step at (x1, t1): in blocks 0..m, out blocks k-m..k from the cache
        _, hs1 = in_blocks(uvit, x1, t1, n=m + 1)
        u = h
        for i in range(k - m, k + 1):
            u = uvit.out_blocks[i](u, hs1[k - i])
        ref = uvit.head(u)
        full1 = uvit(x1, t1).sample
    assert (kind0, kind1) == ("full", f"partial@{m}")
    assert torch.equal(cache._cache[0], h)
    torch.testing.assert_close(out1, ref, atol=1e-6, rtol=0)
    assert (out1 - full1).abs().max() > 1e-4  # it really reused the cache


def test_partial_macs_fall_with_the_branch(adapter):
    macs = [DeepCache(interval=2, branch=m).measure_macs(adapter, _x(7)) for m in range(adapter.num_skips)]
    full = macs[0]["full"]
    parts = [mc[f"partial@{m}"] for m, mc in enumerate(macs)]
    assert all(mc["full"] == full for mc in macs)
    assert all(a < b for a, b in zip(parts, parts[1:] + [full]))


def test_deepcache_sampling_on_uvit(adapter):
    from fewstep.samplers.ddim import sample_ddim
    from fewstep.schedule import select_timesteps

    sched = NoiseSchedule.from_config()
    ts = select_timesteps(sched, 6, "leading")
    assert build_cache(group("cache", "deepcache", interval=1), adapter) is None
    cache = build_cache(group("cache", "deepcache", interval=3, branch=1), adapter)
    plain, cached = Denoiser(adapter, sched), Denoiser(adapter, sched, cache=cache)
    with torch.no_grad():
        a = sample_ddim(plain, _x(8), ts, sched)
        b = sample_ddim(cached, _x(8), ts, sched)
    assert cached.calls == Counter({"full": 2, "partial@1": 4})
    assert torch.isfinite(b).all() and 0 < (a - b).abs().max() < a.abs().max()
    with pytest.raises(ValueError, match="branch"):
        build_cache(group("cache", "deepcache", interval=2, branch=3), adapter)


# ---------------------------------------------------------------------------- config, pretrained, CLI
def test_pretrained_round_trip_through_the_config(uvit, tmp_path):
    from fewstep.build import build_denoiser
    from fewstep.strategies.variance import model_id

    uvit.save_pretrained(str(tmp_path / "uvit"))
    model = build_denoiser(compose_cfg([*TINY_UVIT_OVERRIDES, f"backbone.pretrained={tmp_path / 'uvit'}"]),
                           torch.device("cpu"))
    assert isinstance(model.backbone, UViTAdapter) and model_id(model.backbone) == model_id(uvit)
    x = _x(9)
    with torch.no_grad():
        assert torch.equal(model(x, 321), uvit(x, torch.full((3,), 321.0)).sample)


def test_run_py_samples_a_uvit_with_skip_tuning_deepcache_and_bf16(tmp_path):
    from test_run import run_py

    out = tmp_path / "run"
    run_py(*TINY_UVIT_OVERRIDES, "logger=none", "sampler=ddim", "sampler.steps=4", "skip.rho_bottom=0.6",
           "cache=deepcache", "cache.interval=2", "cache.branch=1", "n_samples=6", "batch_size=3", "autocast=bf16",
           f"hydra.run.dir={out}")
    m = json.loads((out / "metrics.json").read_text())
    assert m["autocast"] == "bf16"
    assert m["nfe"] == 4 and m["calls_full"] == 2 and m["calls_partial_1"] == 2 and m["n_samples"] == 6
    assert m["macs_partial_1"] < m["macs_full"] and m["macs_per_sample"] == 2 * (m["macs_full"] + m["macs_partial_1"])
    p = run_py(*TINY_UVIT_OVERRIDES, "logger=none", "backbone.config.patch_size=3", f"hydra.run.dir={tmp_path / 'bad'}",
               check=False)
    assert p.returncode == 2 and not (tmp_path / "bad" / "metrics.json").exists()
    assert p.stderr.strip().splitlines()[-1] == "fewstep: error: U-ViT patch_size=3 must divide the image size 8"


def test_learned_rho_on_uvit(tmp_path):
    """task=tune_rho fits one rho per long skip; skip=learned then samples exactly what the tuner's student did."""
    import numpy as np

    from fewstep.build import build_denoiser
    from fewstep.tasks.evaluate import generate
    from fewstep.tasks.tune_rho import fit, initial_noise

    common = [*TINY_UVIT_OVERRIDES, "sampler=dpmpp", "sampler.steps=3", "logger=none"]
    cfg = compose_cfg([*common, "task=tune_rho", "task.teacher_steps=10", "task.n_train=8", "task.n_val=4",
                       "task.batch_size=8", "task.max_steps=8", "task.lr=0.1", "task.progress=false",
                       "skip.rho_bottom=0.8", f"task.cache_dir={tmp_path / 'teacher'}"])
    torch.manual_seed(0)
    result, tuner = fit(cfg, tmp_path / "run")
    rho = tuner.rho().detach()
    assert rho.shape == (3,) and result["train_loss_final"] < result["train_loss_init"]
    cfg = compose_cfg([*common, "skip=learned", f"skip.path={result['rho_path']}"])
    torch.manual_seed(0)
    model = build_denoiser(cfg, torch.device("cpu"))
    (hook,) = model.backbone.skip_hooks
    assert hook.scales == [float(v) for v in rho.tolist()]
    idx = np.arange(3)
    z = initial_noise(int(cfg.seed), idx, (1, 8, 8), "cpu")
    with torch.no_grad():
        x_tuned = tuner.student(idx.tolist(), z)
    x_learned, _ = generate(cfg, model, None, (1, 8, 8), torch.device("cpu"), idx)
    assert torch.equal(x_tuned, x_learned)


def test_default_config_size_as_documented():
    """README and conf/backbone/uvit.yaml: 1,510,542 parameters and 0.36 GMACs per call at 28 x 28 (attention included)."""
    from fewstep.build import build_network
    from fewstep.metrics.cost import count_macs

    net = build_network(compose_cfg(["backbone=uvit", "backbone.pretrained=null"]).backbone)
    assert sum(p.numel() for p in net.parameters()) == 1_510_542
    assert round(count_macs(net, torch.randn(1, 1, 28, 28), torch.tensor([5])) / 1e9, 2) == 0.36


def test_the_default_is_the_shipped_model_built_as_the_config_says():
    """backbone=uvit loads checkpoints/fashion_mnist_uvit: the network conf/backbone/uvit.yaml describes (same
    tensors, same shapes), stored in float16 and run in float32, with its training state beside it."""
    from safetensors import safe_open

    from fewstep.build import build_network

    cfg = compose_cfg(["backbone=uvit"])
    folder = Path(cfg.backbone.pretrained)
    assert folder == REPO / "checkpoints" / "fashion_mnist_uvit"
    shipped = build_network(cfg.backbone)
    fresh = build_network(compose_cfg(["backbone=uvit", "backbone.pretrained=null"]).backbone)
    assert {k: v.shape for k, v in shipped.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    assert {p.dtype for p in shipped.parameters()} == {torch.float32}
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    state = json.loads((folder / "train_state.json").read_text())
    assert state["backbone"] == "uvit" and state["stored_dtype"] == "float16" and state["total_steps"] > 0
    assert not any(torch.equal(a, b) for a, b in zip(shipped.parameters(), fresh.parameters()) if a.numel() > 1)


def test_ship_stores_half_precision_weights_that_load_into_the_float32_network(uvit, tmp_path, capsys):
    """experiments/training/ship.py: the stored copy is float16, from_pretrained reads it back as float32, every
    weight within float16 rounding of the original (relative 2^-11), and train_state.json says so."""
    import importlib.util

    from safetensors import safe_open

    from fewstep.build import load_pretrained

    spec = importlib.util.spec_from_file_location("ship", REPO / "experiments" / "training" / "ship.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    src, dst = tmp_path / "export", tmp_path / "shipped"
    uvit.save_pretrained(str(src), safe_serialization=True)
    (src / "train_state.json").write_text(json.dumps({"total_steps": 7}))
    assert ship.main([str(src), str(dst), "--backbone", "uvit"]) == 0
    assert "largest relative change" in capsys.readouterr().out
    with safe_open(str(dst / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    back = load_pretrained(str(dst), None, "uvit")
    assert {p.dtype for p in back.parameters()} == {torch.float32}
    for (k, a), b in zip(uvit.state_dict().items(), back.state_dict().values()):
        assert torch.equal(b, a.half().float()), k          # exactly the float16 rounding, nothing else
        assert torch.allclose(b, a, rtol=2 ** -11, atol=1e-7), k
    state = json.loads((dst / "train_state.json").read_text())
    assert state["total_steps"] == 7 and state["stored_dtype"] == "float16" and state["shipped_from"] == str(src)
    assert (src / "diffusion_pytorch_model.safetensors").stat().st_size > 1.9 * (
        dst / "diffusion_pytorch_model.safetensors").stat().st_size
    assert ship.main([str(tmp_path / "nowhere"), str(dst), "--backbone", "uvit"]) == 2
