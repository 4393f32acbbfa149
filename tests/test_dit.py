"""backbone=dit: the DiT adapter (= diffusers' DiTTransformer2DModel), skip=residual and cache=block on it
(and skip=residual on the U-ViT), guidance with its null class, training, and the one-line refusals."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import assert_one_line_error, compose_cfg
from fewstep.backbones.dit import DiTAdapter, check_blocks
from fewstep.denoiser import Denoiser
from fewstep.schedule import NoiseSchedule
from fewstep.strategies.block_cache import BlockCache
from fewstep.strategies.residual import residual_scales
from fewstep.strategies.skip import CondRowsOnly, ScaleSkips

C = 3                 # classes; label C is the null class of the label table
TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=4,
            sample_size=8, patch_size=2, num_embeds_ada_norm=C)
# the same tiny DiT from the command line / compose (dataset=digits: 8 x 8, 1 channel)
TINY_DIT_OVERRIDES = ["backbone=dit", "dataset=digits", "backbone.config.num_layers=4",
                      "backbone.config.num_attention_heads=2", "backbone.config.attention_head_dim=8",
                      "backbone.config.num_embeds_ada_norm=3", "metrics=cost"]


def make_dit(seed=0, **overrides):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(**{**TINY, **overrides}).eval()


@pytest.fixture(scope="module")
def dit():
    return make_dit()


def inputs(n=3, c=1, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, s, s, generator=g), torch.arange(n) % (C + 1)   # the null class included


def schedule():
    return NoiseSchedule.from_config("linear", 1000)


# ---------------------------------------------------------------------------- the adapter
@pytest.mark.parametrize("overrides", [{}, dict(out_channels=2), dict(patch_size=4, in_channels=2, out_channels=4,
                                                                      num_layers=2, activation_fn="gelu")])
def test_adapter_equals_dit_forward(overrides):
    net = make_dit(seed=1, **overrides)
    a = DiTAdapter(net)
    x, y = inputs(c=net.config.in_channels)
    assert a.num_blocks == net.config.num_layers and len(a.residuals) == 2 * a.num_blocks
    with torch.no_grad():
        for t in (torch.tensor([1.0, 250.5, 999.0]), torch.tensor([3, 500, 900]), torch.tensor(17.0)):
            ref = net(x, t.expand(3) if t.ndim == 0 else t, class_labels=y).sample
            assert ref.shape == (3, net.config.out_channels or net.config.in_channels, 8, 8)
            assert torch.equal(a(x, t, class_labels=y), ref)                       # bit for bit
        t = torch.tensor([1.0, 250.5, 999.0])
        assert not torch.equal(a(x, t, class_labels=(y + 1) % (C + 1)), a(x, t, class_labels=y))  # labels used


def test_null_class_and_learned_sigma_as_dit_pipeline():
    """label C (= num_embeds_ada_norm) is the table's extra null row; with out_channels = 2 C the denoiser keeps
    the first C channels, and CFG combines them with the null-class row as DiTPipeline does."""
    from fewstep.build import class_embeds_of
    from fewstep.strategies.guidance import Guidance

    net = make_dit(seed=2, out_channels=2)
    assert class_embeds_of("dit", dict(net.config)) == C + 1
    assert net.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == C + 1
    x, _ = inputs()
    y = torch.tensor([0, 2, 1])
    w = 2.5
    model = Denoiser(DiTAdapter(net), schedule(), guidance=Guidance(w), null_label=C)
    with torch.no_grad():
        got = model(x, 400.0, class_labels=y)
        # DiTPipeline: one batch [x; x] with labels [y; null], eps = the first C channels, guided
        noise_pred = net(torch.cat([x, x]), torch.full((6,), 400.0), class_labels=torch.cat([y, torch.full_like(y, C)])).sample
        eps = noise_pred[:, :1]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    assert torch.equal(got, uncond_eps + w * (cond_eps - uncond_eps))
    assert model.calls == {"full": 1} and model.rows == {"full": 2}


# ---------------------------------------------------------------------------- skip=residual
def test_residual_scales_follow_the_linear_rule():
    L = 5
    rule = [0.5 + b * (1.0 - 0.5) / (L - 1) for b in range(L)]
    assert residual_scales(L, 1.0, 0.5, "block") == [r for r in rule for _ in range(2)]
    branch = residual_scales(L, 1.0, 0.5, "branch")
    assert branch == pytest.approx([0.5 + i * 0.5 / (2 * L - 1) for i in range(2 * L)], abs=0)
    attn = residual_scales(L, 1.0, 0.5, "block", "attn")
    assert attn[0::2] == rule and attn[1::2] == [1.0] * L
    mlp = residual_scales(L, 1.0, 0.5, "branch", "mlp")
    assert mlp[0::2] == [1.0] * L and mlp[1::2] == pytest.approx(rule)
    assert residual_scales(L, 1.0, 1.0) == [1.0] * (2 * L)
    with pytest.raises(ValueError, match="granularity"):
        residual_scales(L, 1.0, 0.5, "level")


def test_residual_rho_one_is_bit_identical_and_installs_nothing(dit):
    from fewstep.strategies.skip import build_skip

    cfg = compose_cfg([*TINY_DIT_OVERRIDES, "skip=residual"]).skip
    a = DiTAdapter(dit)
    assert build_skip(cfg, a) == []
    x, y = inputs()
    t = torch.tensor([5.0, 400.0, 990.0])
    with torch.no_grad():
        ref = dit(x, t, class_labels=y).sample
        a.residual_hooks.append(ScaleSkips([1.0] * len(a.residuals)))     # a hook whose every rho is 1
        assert torch.equal(a(x, t, class_labels=y), ref)


def _scaled_by_diffusers_hooks(dit, scales):
    """Reference: multiply the outputs of attn1 / ff of block b by rho with torch forward hooks on diffusers'
    own modules (before the adaLN-Zero gate: the same product, in another order)."""
    handles = []
    for b, blk in enumerate(dit.transformer_blocks):
        for mod, i in ((blk.attn1, 2 * b), (blk.ff, 2 * b + 1)):
            handles.append(mod.register_forward_hook(lambda m, inp, out, r=scales[i]: out * r))
    return handles


def test_residual_scaling_equals_scaling_diffusers_branches(dit):
    from fewstep.strategies.skip import build_skip

    cfg = compose_cfg([*TINY_DIT_OVERRIDES, "skip=residual", "skip.rho_bottom=0.6", "skip.rho_top=1.2",
                       "skip.granularity=branch"]).skip
    a = DiTAdapter(dit)
    a.residual_hooks.extend(build_skip(cfg, a))
    scales = residual_scales(a.num_blocks, 1.2, 0.6, "branch")
    x, y = inputs()
    t = torch.tensor([5.0, 400.0, 990.0])
    handles = _scaled_by_diffusers_hooks(dit, scales)
    try:
        with torch.no_grad():
            ref = dit(x, t, class_labels=y).sample
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        got = a(x, t, class_labels=y)
        plain = dit(x, t, class_labels=y).sample
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert (got - plain).abs().max() > 1e-3                          # and it did change the output


def test_residual_t_range_and_rows_cond(dit):
    """Outside t_range a sample is the plain network's; with rows=cond the unconditional rows are plain."""
    a = DiTAdapter(dit)
    x, y = inputs()
    t = torch.tensor([100.0, 500.0, 900.0])
    scales = residual_scales(a.num_blocks, 1.0, 0.5)
    with torch.no_grad():
        plain = a(x, t, class_labels=y)
        a.residual_hooks = [ScaleSkips(scales)]
        everywhere = a(x, t, class_labels=y)
        a.residual_hooks = [ScaleSkips(scales, t_range=[400, 600])]
        window = a(x, t, class_labels=y)
        a.residual_hooks = [CondRowsOnly(ScaleSkips(scales), a)]
        a.cond_rows = 1
        cond_only = a(x, t, class_labels=y)
        a.cond_rows = None
    assert torch.equal(window[[0, 2]], plain[[0, 2]]) and torch.equal(window[1], everywhere[1])
    assert torch.equal(cond_only[1:], plain[1:]) and torch.equal(cond_only[0], everywhere[0])


def test_residual_norms_are_branch_over_stream(dit):
    """The skip-norm recorder on the residual hooks measures ||r_i|| / ||h|| with r_i after the gate."""
    from fewstep.tasks.skip_norms import measure_skip_norms

    a = DiTAdapter(dit)
    x, y = inputs()
    t = torch.full((3,), 300.0)
    seen = {}
    handles = []
    for b, blk in enumerate(dit.transformer_blocks):   # the stream entering block b and its attention branch
        handles.append(blk.register_forward_pre_hook(
            lambda m, args, kwargs, b=b: seen.__setitem__(("h", b), args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        handles.append(blk.attn1.register_forward_hook(lambda m, i, o, b=b: seen.__setitem__(("a", b), o)))
    try:
        with torch.no_grad():
            dit(x, t, class_labels=y)
            emb = [blk.norm1(seen[("h", b)], t, y, hidden_dtype=x.dtype)[1] for b, blk in enumerate(dit.transformer_blocks)]
    finally:
        for h in handles:
            h.remove()
    rows = measure_skip_norms(a, lambda callback: a(x, t, class_labels=y), {"plain": []}, hooks="residual_hooks",
                              infos="residuals")
    assert [r["depth"] for r in rows] == list(range(2 * a.num_blocks)) and {r["step"] for r in rows} == {0}
    for b in range(a.num_blocks):
        r = emb[b].unsqueeze(1) * seen[("a", b)]
        h = seen[("h", b)]
        ref = (r.flatten(1).norm(dim=1) / h.flatten(1).norm(dim=1)).mean()
        assert rows[2 * b]["prop"] == pytest.approx(float(ref), rel=1e-5)
        assert rows[2 * b]["level"] == b and rows[2 * b + 1]["level"] == b
    assert a.residual_hooks == []


def test_uvit_residual_branches(dit):
    """skip=residual on the U-ViT: rho = 1 is bit-identical; rho scales each block's attention / MLP outputs."""
    from fewstep.backbones.uvit import UViT, UViTAdapter

    torch.manual_seed(0)
    net = UViT(sample_size=8, in_channels=1, out_channels=1, patch_size=2, embed_dim=32, depth=5, num_heads=4).eval()
    a = UViTAdapter(net)
    assert len(a.residuals) == 2 * 5
    x, _ = inputs()
    t = torch.tensor([5.0, 400.0, 990.0])
    scales = residual_scales(5, 1.0, 0.7, "branch")
    blocks = [*net.in_blocks, net.mid_block, *net.out_blocks]
    handles = [mod.register_forward_hook(lambda m, i, o, r=scales[2 * b + j]: o * r)
               for b, blk in enumerate(blocks) for j, mod in enumerate((blk.attn, blk.mlp))]
    try:
        with torch.no_grad():
            ref = net(x, t).sample
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        plain = net(x, t).sample
        a.residual_hooks = [ScaleSkips([1.0] * 10)]
        assert torch.equal(a(x, t), plain)
        a.residual_hooks = [ScaleSkips(scales)]
        assert torch.equal(a(x, t), ref)


# ---------------------------------------------------------------------------- cache=block
def _steps(model, x, y, ts):
    """A few model calls at changing (x, t), as a sampler makes them."""
    outs = []
    model.reset()
    with torch.no_grad():
        for t in ts:
            e = model(x, t, class_labels=y)
            outs.append(e)
            x = x - 0.05 * e
    return outs


TS = [900.0, 800.0, 700.0, 600.0, 500.0, 400.0, 300.0]


def test_block_cache_interval_one_is_bit_identical(dit):
    x, y = inputs()
    plain = _steps(Denoiser(DiTAdapter(dit), schedule()), x, y, TS)
    cached = Denoiser(DiTAdapter(dit), schedule(), cache=BlockCache(interval=1, first=1, last=1))
    assert all(torch.equal(p, c) for p, c in zip(plain, _steps(cached, x, y, TS)))
    assert cached.calls == {"full": len(TS)}


def test_block_cache_partial_call_is_first_blocks_plus_cached_middle_plus_last_blocks(dit):
    """By hand with diffusers' own blocks: full call at t0 gives delta = h_{L-n} - h_m; the partial call at t1
    is blocks 0..m-1 on the new input, + delta, blocks L-n..L-1, head."""
    a = DiTAdapter(dit)
    m, n, L = 1, 1, a.num_blocks
    x0, y = inputs()
    x1 = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    t0, t1 = torch.full((3,), 700.0), torch.full((3,), 650.0)

    def run(h, t, lo, hi):
        for blk in dit.transformer_blocks[lo:hi]:
            h = blk(h, timestep=t, class_labels=y)
        return h

    with torch.no_grad():
        h_m = run(dit.pos_embed(x0), t0, 0, m)
        delta = run(h_m, t0, m, L - n) - h_m
        ref = a.head(run(run(dit.pos_embed(x1), t1, 0, m) + delta, t1, L - n, L), t1, y)
        cache = BlockCache(interval=3, first=m, last=n)
        out0, kind0 = cache(a, x0, t0, class_labels=y)
        out1, kind1 = cache(a, x1, t1, class_labels=y)
        assert kind0 == "full" and kind1 == "partial@1+1"
        assert torch.equal(out0, dit(x0, t0, class_labels=y).sample)      # the full call is the plain network
        torch.testing.assert_close(out1, ref, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(out1, dit(x1, t1, class_labels=y).sample, atol=1e-4)  # it did reuse
        # with m + n = L - 1 the partial call reuses only one block's residual
        _, c = a.forward_block_full(x0, t0, (2, 1), class_labels=y)
        h2 = run(dit.pos_embed(x0), t0, 0, 2)
        torch.testing.assert_close(c[0], dit.transformer_blocks[2](h2, timestep=t0, class_labels=y) - h2,
                                   rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="at least one middle block"):
        check_blocks((2, 2), L)


def test_block_cache_schedules_and_macs(dit):
    from fewstep.metrics.cost import macs_per_call
    from fewstep.strategies.cache import nonuniform_full_steps

    x, y = inputs()
    model = Denoiser(DiTAdapter(dit), schedule(), cache=BlockCache(interval=3, first=1, last=0))
    _steps(model, x, y, TS)
    assert model.calls == {"full": 3, "partial@1+0": 4}                       # full at 0, 3, 6
    nu = BlockCache(interval=3, first=1, last=1, schedule="nonuniform", power=1.4)
    nu.plan(len(TS))
    model = Denoiser(DiTAdapter(dit), schedule(), cache=nu)
    _steps(model, x, y, TS)
    full = nonuniform_full_steps(len(TS), 3, None, 1.4)[0]                    # DeepCache eq. 5, not a copy
    assert model.calls == {"full": len(full), "partial@1+1": len(TS) - len(full)}
    macs = macs_per_call(model.backbone, x, cache=model.cache, class_labels=y[:1])
    assert 0 < macs["partial@1+1"] < 0.75 * macs["full"]                        # 2 of 4 blocks (+ tokens, head)
    macs_fb = BlockCache(interval=2, first=1, last=0).measure_macs(model.backbone, x[:1], class_labels=y[:1])
    assert macs_fb["partial@1+0"] < macs["partial@1+1"] and macs_fb["full"] == macs["full"]


def test_block_cache_with_cfg_caches_both_rows(dit):
    from fewstep.strategies.guidance import Guidance

    x, y = inputs()
    y = y % C
    w = 2.0
    guided = Denoiser(DiTAdapter(dit), schedule(), cache=BlockCache(interval=2, first=1, last=1),
                      guidance=Guidance(w), null_label=C)
    got = _steps(guided, x, y, TS[:4])
    assert guided.calls == {"full": 2, "partial@1+1": 2} and guided.rows == {"full": 4, "partial@1+1": 4}
    mc, mu = (Denoiser(DiTAdapter(dit), schedule(), cache=BlockCache(interval=2, first=1, last=1)) for _ in range(2))
    mc.reset(), mu.reset()
    xx = x
    with torch.no_grad():
        for t, g in zip(TS[:4], got):
            e_c, e_u = mc(xx, t, class_labels=y), mu(xx, t, class_labels=torch.full_like(y, C))
            ref = e_u + w * (e_c - e_u)
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)
            xx = xx - 0.05 * ref


# ---------------------------------------------------------------------------- config, build, refusals
def test_build_denoiser_from_config_installs_the_strategies():
    from fewstep.build import build_denoiser

    cfg = compose_cfg([*TINY_DIT_OVERRIDES, "skip=residual", "skip.rho_bottom=0.8", "cache=block",
                       "cache.interval=2", "guidance=cfg"])
    model = build_denoiser(cfg, torch.device("cpu"))
    assert isinstance(model.backbone, DiTAdapter) and model.null_label == C
    assert len(model.backbone.residual_hooks) == 1 and isinstance(model.cache, BlockCache)
    assert model.cache.blocks == (1, 1) and model.cache.interval == 2
    x, y = inputs()
    _steps(model, x, y % C, TS[:3])
    assert model.calls == {"full": 2, "partial@1+1": 1}


@pytest.mark.parametrize("overrides,words", [
    (["skip=residual", "skip.rho_bottom=0.7"], "skip=residual scales the attention and MLP residual branches"),
    (["skip=residual", "skip.granularity=level", *TINY_DIT_OVERRIDES], "unknown skip.granularity 'level'"),
    (["skip=residual", "skip.branches=ff", *TINY_DIT_OVERRIDES], "unknown skip.branches 'ff'"),
    (["skip.rho_bottom=0.7", *TINY_DIT_OVERRIDES], "backbone=dit has no long skips for skip=linear"),
    (["cache=block"], "cache=block reuses the middle of a plain stack"),
    (["cache=block", "backbone=uvit"], "use cache=deepcache (its branch m is the U-ViT form"),
    (["cache=block", "cache.first=2", "cache.last=2", *TINY_DIT_OVERRIDES], "at least one middle block"),
    (["cache=deepcache", *TINY_DIT_OVERRIDES], "backbone=dit has none: use cache=block"),
    (["cache=block", "cache.first=-1", *TINY_DIT_OVERRIDES], "cache.first must be an integer >= 0"),
    (["cache=block", "cache.schedule=cosine", *TINY_DIT_OVERRIDES], "unknown cache.schedule 'cosine'"),
    (["backbone.config.patch_size=3", *TINY_DIT_OVERRIDES], "DiT patch_size=3 must divide the image size 8"),
    (["backbone.config.out_channels=3", *TINY_DIT_OVERRIDES], "DiT out_channels must be in_channels"),
])
def test_bad_input_is_one_line_and_exit_2(overrides, words, tmp_path, monkeypatch, capsys, no_model_building):
    """tests/test_bad_input.py's contract: one `fewstep: error:` line, exit 2, nothing built, no metrics.json."""
    cfg = compose_cfg([*overrides, "logger=none", "n_samples=20", "sampler.steps=3"])
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(cfg, tmp_path, capsys, words)


def test_dit_trains_exports_reloads_and_samples(tmp_path):
    """task=train on a DiT: a few steps lower the loss (label dropout with the null class C), the exported
    folder reloads through backbone.pretrained and samples with guidance."""
    import lightning as L

    from fewstep.build import build_denoiser
    from fewstep.data import load_dataset
    from fewstep.tasks import train
    from test_train import TRAIN, fixed_batch_loss

    cfg = compose_cfg([*TINY_DIT_OVERRIDES, "backbone.config.num_embeds_ada_norm=10", *TRAIN])
    torch.manual_seed(0)
    module = train.DiffusionModule(OmegaConf.to_container(cfg.backbone.config, resolve=True),
                                   OmegaConf.to_container(cfg.backbone.schedule, resolve=True), lr=3e-3,
                                   warmup_steps=2, max_steps=40, backbone="dit")
    assert module.null_label == 10
    assert all(m.dropout_prob == 0 for m in module.net.modules() if hasattr(m, "token_drop"))  # ours only
    x, labels = load_dataset(cfg.dataset, "train", with_labels=True)
    x, labels = x[:256], labels[:256]
    probe_y = labels[:128]

    def loss(net):
        return fixed_batch_loss(lambda xt, t: net(xt, t, class_labels=probe_y), module.alpha_bar, x[:128])

    before = loss(module.net.eval())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=32, shuffle=True)
    L.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, loader)
    after = loss(module.net.eval())
    assert after < 0.8 * before, (before, after)

    export = tmp_path / "export"
    args = [*TINY_DIT_OVERRIDES, "backbone.config.num_embeds_ada_norm=10", *TRAIN, f"task.run_dir={tmp_path / 'run'}",
            f"task.export_dir={export}", "task.max_steps=2", "task.ckpt_every=2"]
    result = train.run(compose_cfg(args))
    assert result["steps"] == 2 and (export / "config.json").exists()
    model = build_denoiser(compose_cfg([*TINY_DIT_OVERRIDES, f"backbone.pretrained={export}", "guidance=cfg"]),
                           torch.device("cpu"))
    assert model.null_label == 10 and isinstance(model.backbone, DiTAdapter)
    z = torch.randn(2, 1, 8, 8)
    eps = _steps(model, z, torch.tensor([3, 7]), TS[:2])
    assert all(torch.isfinite(e).all() for e in eps) and model.rows == {"full": 4}


def test_skip_norms_task_on_dit_records_every_branch_with_labels(tmp_path):
    """task=skip_norms on a DiT: plain and skip=residual, one row per evaluation and residual branch; the
    block-0 attention ratio of the residual variant is rho_0 times the plain one at the first evaluation."""
    import csv

    from fewstep.tasks import skip_norms

    cfg = compose_cfg([*TINY_DIT_OVERRIDES, "task=skip_norms", "logger=none", "task.batch_size=2", "sampler=ddim",
                       "sampler.steps=3", "skip=residual", "skip.rho_bottom=0.5"])
    result = skip_norms.run(cfg, out_dir=str(tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "skip_norms.csv")))
    L = 4
    assert len(rows) == 2 * 3 * 2 * L and result["nfe/plain"] == 3 and result["nfe/residual"] == 3
    assert sorted({int(r["depth"]) for r in rows}) == list(range(2 * L))
    first = {(r["variant"], int(r["depth"])): float(r["prop"]) for r in rows if r["step"] == "0"}
    assert first[("residual", 0)] == pytest.approx(0.5 * first[("plain", 0)], rel=1e-5)
    assert (tmp_path / "skip_norms.png").exists()


def test_block_cache_bench_counts_calls_and_macs_and_writes_its_files(tmp_path):
    """make bench's block_cache on a tiny DiT: the schedule's call counts, partial MACs below full, the files."""
    import json

    from fewstep.bench import block_cache

    res = block_cache.main(out_dir=str(tmp_path), layers=4, size=(1, 4), intervals=(2,), repeats=1, rounds=1,
                           arch=dict(num_attention_heads=2, attention_head_dim=8, sample_size=8, num_embeds_ada_norm=10))
    rows = {(r["interval"], r["first"], r["last"]): r for r in res["rows"]}
    assert rows[(1, None, None)]["full"] == 4 and rows[(1, None, None)]["partial"] == 0
    assert rows[(2, 1, 1)]["full"] == 2 and rows[(2, 1, 1)]["partial"] == 2
    assert res["macs"]["partial@1+0"] < res["macs"]["partial@1+1"] < res["macs"]["full"]
    assert rows[(2, 1, 0)]["macs_speedup"] == pytest.approx(
        4 * res["macs"]["full"] / (2 * res["macs"]["full"] + 2 * res["macs"]["partial@1+0"]))
    assert json.loads((tmp_path / "block_cache.json").read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    md = (tmp_path / "block_cache.md").read_text()
    assert "| 2 | 1 + 1 | 2 / 2 |" in md
    (tmp_path / "block_cache.md").unlink()
    block_cache.render(str(tmp_path))                              # --render: the same text from the json
    assert (tmp_path / "block_cache.md").read_text() == md


def test_default_dit_config_size_as_documented():
    """README and conf/backbone/dit.yaml: the default DiT for 28 x 28 Fashion-MNIST has 2,120,068 parameters
    and 0.29 GMACs per call (count_macs counts attention)."""
    from fewstep.build import new_network
    from fewstep.metrics.cost import count_macs

    cfg = compose_cfg(["backbone=dit"])
    net = new_network("dit", OmegaConf.to_container(cfg.backbone.config, resolve=True)).eval()
    assert net.config.sample_size == 28 and net.config.patch_size == 2 and net.config.num_embeds_ada_norm == 10
    assert sum(p.numel() for p in net.parameters()) == 2_120_068
    macs = count_macs(DiTAdapter(net), torch.randn(1, 1, 28, 28), torch.tensor([5.0]), class_labels=torch.tensor([1]))
    assert round(macs / 1e9, 2) == 0.29
