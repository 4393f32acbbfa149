"""The benchmarks run end to end at tiny sizes and write what they measured (no timing is asserted)."""
import json

import pytest

from fewstep.bench import batch, deepcache, precision, samplers


@pytest.fixture(scope="module")
def deepcache_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = deepcache.main(out_dir=str(out), models=["fashion_mnist"], modes=["eager"], intervals=[2],
                             branches=[1], sizes={"fashion_mnist": (1, 4)}, repeats=1, rounds=1, device="cpu")
    return out, results[0]


def test_deepcache_bench_counts_calls_and_macs(deepcache_run):
    _, res = deepcache_run
    base, cached = res["modes"]["eager"]["rows"]
    # N = 1 is added as the baseline even when not asked for; 4 steps at N = 2: full calls at steps 0, 2
    assert (base["interval"], base["full"], base["partial"]) == (1, 4, 0)
    assert (cached["interval"], cached["branch"], cached["full"], cached["partial"]) == (2, 1, 2, 2)
    full, part = res["macs"]["full"], res["macs"]["partial@1"]
    assert 0 < part < full
    assert cached["macs_speedup"] == pytest.approx(4 * full / (2 * full + 2 * part), rel=1e-12)
    assert base["rel_dev"] == 0 and cached["rel_dev"] > 0      # the cache changes the output, N = 1 does not
    assert cached["wall_s"] > 0 and cached["ratio"] == pytest.approx(cached["wall_speedup"] / cached["macs_speedup"])


def test_deepcache_bench_writes_json_and_markdown(deepcache_run):
    out, res = deepcache_run
    data = json.loads((out / "deepcache.json").read_text())
    assert data["results"][0]["macs"] == res["macs"] and data["repeats"] == 1
    md = (out / "deepcache.md").read_text()
    assert "batch 1 x 4 steps" in md and "| 2 | 1 | 2 / 2 |" in md
    assert "Predicted for the paper's protocol" in md        # 4 steps is not the paper's 100: priced from calls
    (out / "deepcache.md").unlink()
    deepcache.render(str(out))                                # --render rewrites the same text from the json
    assert (out / "deepcache.md").read_text() == md


@pytest.mark.parametrize("kwargs, match", [(dict(models=["imagenet"]), "unknown model 'imagenet'"),
                                           (dict(modes=["jit"]), "unknown mode 'jit'")])
def test_deepcache_bench_rejects_bad_input(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        deepcache.main(out_dir=str(tmp_path), **kwargs)
    assert not list(tmp_path.iterdir())


def test_samplers_bench_matches_diffusers_and_writes_markdown(tmp_path, monkeypatch):
    rows = samplers.bench_model("small", batch=1, steps=3, repeats=1)
    monkeypatch.setattr(samplers, "bench_model", lambda *a, **k: rows)   # main() writes these rows, no rerun
    path = samplers.main(out_dir=str(tmp_path), models=("small",), batch=1, steps=3, repeats=1)
    assert [r["sampler"] for r in rows] == ["DDIM", "DPM-Solver++(2M)"]
    for r in rows:
        assert r["max_abs_diff"] < 1e-3                      # same trajectory as diffusers' loop
        assert r["fewstep_loop_ms"] >= r["fewstep_model_ms"] > 0
    assert "DPM-Solver++(2M)" in path.read_text()


def test_samplers_bench_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark model"):
        samplers.main(out_dir=str(tmp_path), models=("nope",))
    with pytest.raises(ValueError, match="steps >= 2"):
        samplers.main(out_dir=str(tmp_path), models=("small",), steps=1)


def test_precision_bench_writes_ratios_and_errors(tmp_path):
    path = precision.main(out_dir=str(tmp_path), batch=2, repeats=1)
    md = path.read_text()
    table = [line.split(" | ") for line in md.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(table) == 2 * 3 and {r[1] for r in table} == {"float32", "bf16", "fp16"}
    for r in table:
        errs = [float(v.strip(" |")) for v in r[4:]]
        assert len(errs) == 4 and all(e == 0 for e in errs) == (r[1] == "float32")
        assert all(0 <= e < 0.1 for e in errs)   # low precision is close to float32, not equal
        if r[1] == "float32":
            assert r[3] == "1.00x"
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="need batch >= 1"):
        precision.main(out_dir=str(tmp_path / "bad"), batch=0)
    assert not (tmp_path / "bad").exists()


def _batch_tables(md: str):
    """{section title: [row cells]} of the batch bench's markdown."""
    tables, title = {}, None
    for line in md.splitlines():
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("| ") and not line.startswith("| threads"):
            tables.setdefault(title, []).append([c.strip() for c in line.strip("|").split("|")])
    return tables


def test_batch_bench_writes_both_allocators(tmp_path):
    path = batch.main(out_dir=str(tmp_path), batches=(1, 3), threads=(1,), images=3, repeats=1)
    tables = _batch_tables(path.read_text())
    assert len(tables) == 2 and "Default allocator" in tables
    for rows in tables.values():
        assert [(r[0], r[1]) for r in rows] == [("1", "1"), ("1", "3")]
        ratios = [float(r[3].rstrip("x")) for r in rows]
        assert max(ratios) == 1.0 and all(0 < x <= 1 for x in ratios)
        # the largest activation is linear in the batch size (same network, same layer)
        mib = [float(r[7].split()[0]) for r in rows]
        assert mib[1] == pytest.approx(3 * mib[0], rel=0.02)
    assert not list(tmp_path.glob("*.tmp"))


def test_batch_bench_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="need batch sizes >= 1"):
        batch.main(out_dir=str(tmp_path / "bad"), batches=(0, 64))
    with pytest.raises(ValueError, match="thread counts >= 1"):
        batch.main(out_dir=str(tmp_path / "bad"), threads=())
    assert not (tmp_path / "bad").exists()
