"""experiments/report.py: the tables of experiments/README.md come from sweep summaries through it."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import experiments/<name>.py (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def report():
    return load_script("report")


def write_sweep(path: Path, rows):
    path.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(path / "summary.csv", index=False)


def run(report, capsys, *argv):
    old = sys.argv
    sys.argv = ["report.py", *argv]
    try:
        report.main()
    finally:
        sys.argv = old
    return capsys.readouterr().out


def test_table_where_and_override_columns(report, tmp_path, capsys):
    # an older sweep without the timesteps column (read from its overrides) and a newer one with it
    write_sweep(tmp_path / "old", [
        dict(job="0", overrides="sampler=dpmpp sampler.steps=5", sampler="dpmpp", nfe=5, fid=351.3),
        dict(job="1", overrides="sampler=dpmpp sampler.timesteps=linspace sampler.steps=5", sampler="dpmpp", nfe=5, fid=61.0)])
    write_sweep(tmp_path / "new", [
        dict(job="0", overrides="+sampler.endpoint=False sampler.timesteps=logsnr", sampler="dpmpp", nfe=10, fid=52.4,
             timesteps="logsnr", endpoint=False),
        dict(job="1", overrides="sampler.steps=10", sampler="dpmpp", nfe=10, fid=47.9, timesteps="linspace", endpoint=True)])
    (tmp_path / "old" / "0" / ".hydra").mkdir(parents=True)   # its grid then: from the job's resolved config
    (tmp_path / "old" / "0" / ".hydra" / "config.yaml").write_text("sampler:\n  name: dpmpp\n  timesteps: logsnr\n")
    out = run(report, capsys, "table", str(tmp_path / "old"), "--rows", "timesteps", "endpoint")
    assert "| linspace | True | 61 |" in out and "| logsnr | True | 351.3 |" in out
    out = run(report, capsys, "table", str(tmp_path / "old"), str(tmp_path / "new"), "--rows", "timesteps",
              "--where", "timesteps=linspace")
    lines = out.strip().splitlines()
    assert lines[0] == "| timesteps | nfe=5 | nfe=10 |"
    assert lines[2] == "| linspace | 61 | 47.9 |"
    assert len(lines) == 3                                    # the logsnr rows are filtered out
    out = run(report, capsys, "list", str(tmp_path / "new"), "--keys", "timesteps", "endpoint", "fid",
              "--where", "endpoint=False")
    assert "| logsnr | False | 52.4 |" in out and "linspace" not in out
    with pytest.raises(SystemExit, match="no column 'bogus'"):
        run(report, capsys, "list", str(tmp_path / "new"), "--where", "bogus=1")


def test_sampler_label_names_order_and_lower_order_final(report, tmp_path, capsys):
    write_sweep(tmp_path / "s", [
        dict(job="0", overrides="sampler=dpmpp sampler.steps=20", sampler="dpmpp", nfe=20, fid=48.0),
        dict(job="1", overrides="sampler=dpmpp sampler.order=3 sampler.steps=20", sampler="dpmpp", nfe=20, fid=73.1),
        dict(job="2", overrides="sampler=dpmpp sampler.order=3 sampler.lower_order_final=always sampler.steps=20",
             sampler="dpmpp", nfe=20, fid=50.0)])
    out = run(report, capsys, "table", str(tmp_path / "s"), "--rows", "sampler_label")
    assert "| dpmpp | 48 |" in out and "| dpmpp(order 3) | 73.1 |" in out
    assert "| dpmpp(order 3, lower_order_final=always) | 50 |" in out


def test_fit_rho_recovers_a_known_law(report, capsys):
    C, alpha = 0.6, 0.8
    rows = []
    for M in (5, 10, 20, 50):
        best = 1 - C / M ** alpha
        for rho in np.round(np.arange(0.5, 1.0001, 0.001), 3):
            rows.append(dict(nfe=M, rho_bottom=rho, fid=(rho - best) ** 2))
    report.fit_rho(pd.DataFrame(rows))
    out = capsys.readouterr().out
    fit = out.strip().splitlines()[-1]
    got = dict(kv.split(" = ") for kv in fit.split(": ", 1)[1].split(", "))
    (c, c_se), (a, a_se) = (map(float, got[k].split(" +- ")) for k in ("C", "alpha"))
    assert c == pytest.approx(C, abs=0.01) and a == pytest.approx(alpha, abs=0.01)
    assert float(got["RMS error"]) < 1e-3
    assert 0 < c_se < 0.01 and 0 < a_se < 0.01          # the grid step (0.001) bounds the scatter


def test_fit_rho_uncertainty_covers_noisy_optima(report, capsys):
    """rho* read off a noisy sweep: the fit's standard errors are of the size of its miss."""
    C, alpha = 0.6, 0.8
    rng = np.random.default_rng(0)
    rows = []
    for M in (5, 8, 10, 15, 20, 30, 50):
        best = 1 - C / M ** alpha + rng.normal(0, 0.01)
        rows += [dict(nfe=M, rho_bottom=rho, fid=(rho - best) ** 2) for rho in np.round(np.arange(0.5, 1.0001, 0.01), 2)]
    report.fit_rho(pd.DataFrame(rows))
    got = dict(kv.split(" = ") for kv in capsys.readouterr().out.strip().splitlines()[-1].split(": ", 1)[1].split(", "))
    (c, c_se), (a, a_se) = (map(float, got[k].split(" +- ")) for k in ("C", "alpha"))
    assert abs(c - C) < 3 * c_se and abs(a - alpha) < 3 * a_se
    assert 0.005 < c_se < 0.2 and 0.005 < a_se < 0.2


def test_rho_law_errors_are_at_least_the_grid_rounding(report):
    """A best rho is known only to its grid's resolution: three optima on one line (rho* = 0.9 at every M, a
    0.05 grid) fit exactly, yet C and alpha get the standard errors of points rounded to 0.05, not 0."""
    assert report.grid_width([0.5, 0.8, 0.85, 0.9, 0.95, 1.05], 0.9) == pytest.approx(0.05)
    assert report.grid_width([0.5, 0.6, 0.7], 0.5) == pytest.approx(0.1)          # an edge: its one gap
    assert report.grid_width([0.5, 0.6, 0.8], 0.6) == pytest.approx(0.15)
    M, r = [5, 10, 20], [0.9, 0.9, 0.9]
    bare = report.rho_law(M, r)
    assert bare["rms"] < 1e-9 and bare["alpha_se"] < 1e-6                          # residuals alone: "exact"
    law = report.rho_law(M, r, [0.05] * 3)
    assert law["C"] == pytest.approx(bare["C"]) and law["alpha"] == pytest.approx(bare["alpha"], abs=1e-6)
    assert 0.005 < law["C_se"] < 0.05 and 0.01 < law["alpha_se"] < 0.2


def test_frontier_marks_the_pareto_front_and_the_best_per_budget(report, tmp_path, capsys):
    full = 1e8
    rows = [  # (config overrides, fid, MACs in full calls, wall s): c is beaten by b (cheaper and better)
        dict(job="a", sampler="dpmpp", steps=5, fid=30.0, macs_per_sample=5 * full, wall_time_s=5.0),
        dict(job="b", sampler="dpmpp", steps=10, fid=12.0, macs_per_sample=10 * full, wall_time_s=10.0),
        dict(job="c", sampler="ddim", steps=10, fid=15.0, macs_per_sample=10 * full, wall_time_s=9.0),
        dict(job="d", sampler="ddim", steps=20, fid=20.0, macs_per_sample=20 * full, wall_time_s=20.0),
        dict(job="e", sampler="ddim", steps=20, cache="deepcache", interval=3, fid=11.0,
             macs_per_sample=8 * full, wall_time_s=12.0, overrides="cache=deepcache cache.interval=3"),
        dict(job="f", sampler="heun", steps=15, fid=10.0, macs_per_sample=30 * full, wall_time_s=11.0),
    ]
    for r in rows:
        r.update(macs_full=full, n_samples=10, fid_se=0.5)
        r.setdefault("overrides", "")
    write_sweep(tmp_path / "s", rows)
    out = run(report, capsys, "frontier", str(tmp_path / "s"), "--out", str(tmp_path / "f.png"))
    table, budgets = out.split("\n\n")[:2]
    marks = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[-2:] for line in table.splitlines()[2:]}
    assert marks["dpmpp 5"] == ["yes", "yes |"]
    assert marks["ddim 20, deepcache N=3"] == ["yes", " |"]       # cheapest at FID 11 in MACs; heun beats it in wall
    assert marks["heun 15"] == ["yes", "yes |"]                   # the lowest FID is on both fronts
    assert marks["dpmpp 10"] == ["", "yes |"]                     # beaten in MACs by the cached DDIM
    assert marks["ddim 10"][0] == "" and marks["ddim 20"] == ["", " |"]
    assert "| <= 5 | dpmpp 5 | 30 |" in budgets and "| <= 10 | ddim 20, deepcache N=3 | 11 |" in budgets
    assert "| <= 20 | ddim 20, deepcache N=3 | 11 |" in budgets     # heun's 30 calls are over every budget
    # another sample count is another group with its own front (its FID would beat every row above); a row
    # without a wall time is on no wall front
    rows.append(dict(job="g", sampler="dpmpp", steps=50, fid=5.0, macs_per_sample=50 * full, wall_time_s=float("nan"),
                     macs_full=full, n_samples=5000, fid_se=0.2, overrides=""))
    for r in rows:
        r.setdefault("n_samples", 10)
    write_sweep(tmp_path / "s2", rows)
    out = run(report, capsys, "frontier", str(tmp_path / "s2"))
    assert out.startswith("note: 2 groups of rows (by n_samples)")
    parts = out.split("\n\n")       # note, "10 samples:", its table, "5000 samples:", its table, the budgets
    assert parts[1] == "10 samples:" and parts[3] == "5000 samples:"
    marks = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[-2:] for i in (2, 4) for line in parts[i].splitlines()[2:]}
    assert marks["dpmpp 50"] == ["yes", " |"] and marks["dpmpp 5"] == ["yes", "yes |"] and marks["heun 15"] == ["yes", "yes |"]
    assert "dpmpp 50" not in parts[2] and parts[4].count("\n") == 2          # each group's own table
    budgets = parts[5].splitlines()
    assert "| <= 10 | ddim 20, deepcache N=3 | 11 |" in parts[5] and budgets[-1].endswith("| 5000 samples |")
    assert "| <= 20 | (none tried) |" in parts[5]        # the 5000-sample group has no row within 20 calls
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_fit_rho_says_when_rho_1_is_best(report, capsys):
    rows = [dict(nfe=M, rho_bottom=r, fid=(1 - r) + 1) for M in (5, 10) for r in (0.8, 0.9, 1.0)]
    report.fit_rho(pd.DataFrame(rows))
    assert "best rho_bottom is 1 at every M" in capsys.readouterr().out


def test_fit_rho_refuses_a_fit_through_one_point_below_1(report, capsys):
    rows = [dict(nfe=M, rho_bottom=r, fid=abs(r - (0.9 if M == 5 else 1.0))) for M in (5, 10, 20) for r in (0.8, 0.9, 1.0, 1.1)]
    report.fit_rho(pd.DataFrame(rows))
    out = capsys.readouterr().out
    assert "best rho_bottom < 1 only at M = 5 (0.9)" in out and "no fit" in out and "C =" not in out


def test_fit_rho_fits_a_law_from_above(report, capsys):
    C, alpha = -0.8, 0.5   # rho* = 1.36, 1.25, 1.18, 1.11: deep skips amplified, less so with more steps
    rows = [dict(nfe=M, rho_bottom=rho, fid=(rho - (1 - C / M ** alpha)) ** 2)
            for M in (5, 10, 20, 50) for rho in np.round(np.arange(0.8, 1.5001, 0.001), 3)]
    report.fit_rho(pd.DataFrame(rows))
    got = dict(kv.split(" = ") for kv in capsys.readouterr().out.strip().splitlines()[-1].split(": ", 1)[1].split(", "))
    (c, _), (a, _) = (map(float, got[k].split(" +- ")) for k in ("C", "alpha"))
    assert c == pytest.approx(C, abs=0.01) and a == pytest.approx(alpha, abs=0.01)


def test_fit_rho_flags_the_grid_edge_and_a_crossing_of_1(report, capsys):
    best = {5: 0.9, 10: 1.1, 20: 1.05}   # at M = 10 the best is the highest value tried: a bound, not an optimum
    rows = [dict(nfe=M, rho_bottom=r, fid=abs(r - (1.2 if M == 10 else best[M])))
            for M in best for r in (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1)]
    report.fit_rho(pd.DataFrame(rows))
    out = capsys.readouterr().out
    assert "| 10 | 1.10 | " in out and "| 0.8..1.1 | highest tried |" in out
    assert out.count("est tried |") == 1   # M = 5 and 20 have their optimum inside the grid
    assert "< 1 at M = 5 (0.9) but > 1 at M = 10 (1.1), M = 20 (1.05)" in out and "no fit" in out


def test_single_runs_without_a_summary(report, tmp_path, capsys):
    import json

    for job, rho, fid in (("0_rho1", None, 48.0), ("1_learned", "skip=learned", 45.5)):
        (tmp_path / "runs" / job / ".hydra").mkdir(parents=True)
        (tmp_path / "runs" / job / "metrics.json").write_text(json.dumps({"skip": "learned" if rho else "linear", "fid": fid}))
        (tmp_path / "runs" / job / ".hydra" / "overrides.yaml").write_text(f"- sampler=dpmpp\n- {rho or 'skip=linear'}\n")
        skip = "name: learned\n  path: rho.yaml" if rho else "name: linear\n  rho_top: 1.0\n  rho_bottom: 1.0"
        (tmp_path / "runs" / job / ".hydra" / "config.yaml").write_text(f"skip:\n  {skip}\n")
    out = run(report, capsys, "list", str(tmp_path / "runs"), "--keys", "job", "skip", "rho_bottom", "fid")
    # rho_bottom was not overridden: read from the resolved config where Skip-Tuning is linear, blank otherwise
    assert "| 0_rho1 | linear | 1.0 | 48 |" in out and "| 1_learned | learned |  | 45.5 |" in out


def test_nll_steps_to_match_the_full_bound(report, tmp_path, capsys):
    import json

    def job(sweep, i, K, bpd, var_overrides, per_image=None):
        d = tmp_path / sweep / f"{i}_K{K}"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text("\n".join(f"- {o}" for o in var_overrides) + "\n")
        variance = "analytic" if "variance=analytic" in var_overrides else "fixed"
        (d / "metrics.json").write_text(json.dumps(dict(sampler="ddpm", variance=variance, nll_steps=K, nll_bpd=bpd,
                                                        nll_bpd_se=0.05, nll_n=100)))
        if per_image is not None:
            np.savez(d / "nll_bpd.npz", index=np.arange(100), bpd=per_image)

    spread = np.random.default_rng(0).normal(0, 0.5, 100)           # per-image bounds: image spread + shift
    spread -= spread.mean()
    for i, (K, bpd) in enumerate([(10, 6.7), (1000, 3.9)]):
        job("ddpm", i, K, bpd, ["sampler.var_type=beta", "variance=fixed"], per_image=bpd + spread)
    for i, (K, bpd) in enumerate([(10, 5.5), (50, 4.0), (100, 3.85), (200, 3.7)]):
        job("analytic", i, K, bpd, ["sampler.var_type=beta", "variance=analytic"])
    job("dp", 0, 10, 4.3, ["variance=analytic", "sampler.timesteps=analytic_dp"],
        per_image=4.3 + spread + np.random.default_rng(1).normal(0, 0.01, 100))
    out = run(report, capsys, "nll", str(tmp_path / "ddpm"), str(tmp_path / "analytic"), str(tmp_path / "dp"))
    # only the job with per-image bounds is paired: a 0.4 gap known to about 0.001, not to the 0.05 s.e.
    paired = [line for line in out.splitlines() if line.startswith("| analytic")]
    assert "Paired with DDPM (beta) at K = 1000" in out and len(paired) == 1
    cells = [c.strip() for c in paired[0].strip("|").split("|")]
    assert cells[:3] == ["analytic", "analytic_dp", "10"] and cells[5] == "100"
    assert float(cells[3]) == pytest.approx(0.4, abs=0.005) and 0 < float(cells[4]) < 0.003
    assert "DDPM (beta) at K = 1000: 3.900 bits/dim (100 images)" in out
    assert "Analytic-DDPM, linspace steps: K = 100 reaches it (3.850), 10x fewer steps" in out
    assert "Analytic-DDPM, analytic_dp steps: no K up to 10 reaches it (best 4.300)" in out


def test_plot_writes_a_png(report, tmp_path, capsys):
    write_sweep(tmp_path / "s", [dict(job=str(i), overrides=f"skip.rho_bottom={r}", sampler="dpmpp", nfe=n, fid=50 + 10 * (1 - r))
                                 for i, (r, n) in enumerate([(0.8, 10), (1.0, 10), (0.8, 20), (1.0, 20)])])
    out = tmp_path / "fig" / "rho.png"
    assert f"wrote {out}" in run(report, capsys, "plot", str(tmp_path / "s"), "--hue", "sampler", "nfe", "--out", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # several y columns: one panel each, side by side (a wider figure of the same height)
    wide = tmp_path / "fig" / "panels.png"
    run(report, capsys, "plot", str(tmp_path / "s"), "--x", "rho_bottom", "--y", "fid", "nfe", "--hue", "sampler",
        "--out", str(wide))
    import matplotlib.image

    (h1, w1), (h2, w2) = (matplotlib.image.imread(f).shape[:2] for f in (out, wide))
    assert h1 == h2 and w2 > 1.2 * w1
    with pytest.raises(SystemExit, match="--out"):
        run(report, capsys, "plot", str(tmp_path / "s"))


@pytest.fixture(scope="module")
def build_readme():
    return load_script("build_readme")


def test_build_readme_shows_each_command_above_its_output(build_readme):
    # "every table is printed by the command written above it": the command, as the template writes it, in a
    # bash block, then a blank line (so that a table after it renders as one) and what it printed
    command = "python -c \"print('| a |'); print('| 1 |')\""
    template = f"# title\n@@ {command}\ntext @@ not a command\n"
    assert build_readme.render(template) == (
        f"# title\n```bash\n{command}\n```\n\n| a |\n| 1 |\ntext @@ not a command\n", {})
    assert build_readme.block(command, "| a |\n| 1 |") == f"```bash\n{command}\n```\n\n| a |\n| 1 |"


def test_build_readme_shows_a_silent_command_alone(build_readme):
    # a figure command (> /dev/null) prints nothing: its block alone says how the figure is drawn
    assert build_readme.render("a\n@@ python -c pass > /dev/null\nb\n")[0] == \
        "a\n```bash\npython -c pass > /dev/null\n```\nb\n"


def test_build_readme_check_draws_figures_aside_and_compares_them(build_readme, tmp_path, monkeypatch, capsys):
    draw = "@@ python -c \"import sys; open(sys.argv[2], 'w').write('v2'); print('drawn')\" --out figs/f.png\n"
    (tmp_path / "aside").mkdir()
    text, drawn = build_readme.render("# t\n" + draw, tmp_path / "aside")  # as --check runs it
    # the README shows the command as written (--out figs/f.png), not the temporary file it drew
    assert text == f"# t\n{build_readme.block(draw[3:-1], 'drawn')}\n"
    assert drawn == {"figs/f.png": tmp_path / "aside" / "0.png"}
    assert (tmp_path / "aside" / "0.png").read_text() == "v2" and not (build_readme.ROOT / "figs").exists()

    monkeypatch.setattr(build_readme, "ROOT", tmp_path)
    monkeypatch.setattr(build_readme, "README", tmp_path / "README.md")
    (tmp_path / "README.md").write_text(text)
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "f.png").write_text("v1")
    assert build_readme.check(text, drawn) == 1 and "figure differs" in capsys.readouterr().out
    (tmp_path / "figs" / "f.png").write_text("v2")
    assert build_readme.check(text, drawn) == 0
    assert build_readme.check(text + "more\n", drawn) == 1 and "+more" in capsys.readouterr().out


def test_build_readme_stops_at_a_failing_command(build_readme):
    with pytest.raises(SystemExit, match="command failed .*no_such_script.py"):
        build_readme.render("x\n@@ python no_such_script.py\n")


def test_committed_readme_keeps_every_template_line(build_readme):
    # experiments/README.md is rendered, not hand-edited: the template's own lines appear in it, in order
    readme = iter(build_readme.README.read_text().splitlines())
    for line in build_readme.TEMPLATE.read_text().splitlines():
        if not line.startswith(build_readme.MARK):
            assert any(r == line for r in readme), f"template line missing from experiments/README.md: {line!r}"


def test_committed_readme_was_rendered_from_the_template(build_readme):
    # stronger than the line-order check: every @@ line maps to whole README lines, the rest matches exactly
    committed = build_readme.committed_outputs(build_readme.TEMPLATE.read_text(), build_readme.README.read_text())
    commands = [line[3:] for line in build_readme.TEMPLATE.read_text().splitlines() if line.startswith("@@ ")]
    assert set(committed.outputs) == set(commands)


def py_print(*lines: str) -> str:
    """An @@ command line printing these lines."""
    return "@@ python -c \"print(" + repr("\n".join(lines)) + ")\""


def test_build_readme_only_reruns_matching_commands_and_keeps_the_others(build_readme):
    block = build_readme.block
    a, b_old, b_new = py_print("| a |", "| 1 |")[3:], py_print("B-old")[3:], py_print("B-new")[3:]
    old = "\n".join(["# t", "@@ " + a, "text", "@@ " + b_old, "end"]) + "\n"
    readme = build_readme.render(old)[0]
    assert readme == f"# t\n{block(a, '| a |' + chr(10) + '| 1 |')}\ntext\n{block(b_old, 'B-old')}\nend\n"
    committed = build_readme.committed_outputs(old, readme)
    # what is recovered is each command's whole rendered text, its block included, as render writes it
    assert committed.outputs == {a: block(a, "| a |\n| 1 |"), b_old: block(b_old, "B-old")}
    # the second command is edited: only it runs; the first is not run, its text is what `committed`
    # holds (replaced by "| kept |" here, so that a re-run of it would show)
    new = old.replace(b_old, b_new).replace("text", "new text")
    kept = committed._replace(outputs={**committed.outputs, a: "| kept |"})
    assert build_readme.render(new, only="B-new", committed=kept)[0] == \
        f"# t\n| kept |\nnew text\n{block(b_new, 'B-new')}\nend\n"
    assert build_readme.render(new, only="B-new", committed=committed)[0] == \
        readme.replace("text", "new text").replace(block(b_old, "B-old"), block(b_new, "B-new"))
    with pytest.raises(SystemExit, match="is not there; re-run it"):
        build_readme.render(new, only="no-such-text", committed=committed)
    with pytest.raises(SystemExit, match="not rendered from the committed template"):
        build_readme.committed_outputs(old, readme.replace("text", "edited by hand"))


def test_build_readme_recovers_every_kind_of_block(build_readme):
    # outputs with blank lines, a silent command (its block alone), the same command twice, two commands on
    # adjacent lines: each command's own line in its block pins the split, so every text is recovered
    a, quiet, b = py_print("x", "", "y"), "@@ python -c pass > /dev/null", py_print("", "z")
    template = f"top\n{a}\n\n{quiet}\n{b}\n{a}\n{quiet}\nbottom\n"
    readme = build_readme.render(template)[0]
    committed = build_readme.committed_outputs(template, readme)
    block = build_readme.block
    assert committed.outputs == {a[3:]: block(a[3:], "x\n\ny"), quiet[3:]: block(quiet[3:], ""),
                                 b[3:]: block(b[3:], "\nz")} and committed.chains == []
    assert build_readme.render(template, only="nothing", committed=committed)[0] == readme
    # a README rendered the old way (outputs without their commands) is not a rendering of the template
    old = "top\nx\n\ny\n\n\nz\nx\n\ny\n\nbottom\n"
    with pytest.raises(SystemExit, match="not rendered from the committed template"):
        build_readme.committed_outputs(template, old)


def test_build_readme_keeps_an_ambiguous_stretch_whole(build_readme):
    # A prints B's block between its lines: "x / / B's block / / y / / B's block / / z" splits two ways
    # (A prints x, B prints y ... z; or A prints x ... y, B prints z)
    b = "@@ echo z"
    a = py_print("x", "", "```bash", b[3:], "```", "", "y").replace("`", "\\`")   # no command substitution
    template = f"top\n{a}\n\n{b}\nbottom\n"
    readme = build_readme.render(template)[0]
    assert readme.count(build_readme.block(b[3:], "")) == 2
    committed = build_readme.committed_outputs(template, readme)
    assert committed.outputs == {a[3:]: None, b[3:]: None}
    assert committed.chains == [([a, "", b], readme[len("top\n"):-len("\nbottom\n")])]
    assert build_readme.render(template, only="nothing", committed=committed)[0] == readme
    with pytest.raises(SystemExit, match="is ambiguous there; re-run it"):
        build_readme.render(template, only="print", committed=committed)
    assert build_readme.render(template, only="echo z", committed=committed)[0] == readme


@pytest.mark.parametrize("value, text", [(76.96, "77.0"), (42.83, "42.8"), (0.72, "0.720"), (5.0, "5"),
                                         (152.98, "153.0"), (float("nan"), ""), (None, ""), ("ddim", "ddim")])
def test_fmt_keeps_the_precision_of_every_cell(report, value, text):
    assert report.fmt(value) == text


def test_fid_diff_pairs_runs_by_their_saved_features(report, tmp_path, capsys):
    from fewstep.metrics.fid import FrechetToReference, RefStats

    g = np.random.default_rng(0)
    ref = RefStats(mu=np.zeros(3), cov=np.eye(3), n=10000, pr_features=np.zeros((2, 3)))
    ref_path = ref.save(tmp_path / "ref.npz")
    z = g.normal(size=(500, 3))
    fd = FrechetToReference(ref.mu, ref.cov)
    runs = {"0_base": 1.2 * z, "1_wider": 1.3 * z}
    for name, x in runs.items():
        (tmp_path / "sweep" / name).mkdir(parents=True)
        np.savez(tmp_path / "sweep" / name / "features.npz", features=x.astype(np.float32),
                 ref_stats=np.array(str(ref_path)), fid=np.float64(fd(torch.from_numpy(x))))
    out = run(report, capsys, "fid_diff", str(tmp_path / "sweep"))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")][1:]
    assert [r[0] for r in rows] == ["0_base", "1_wider"] and rows[0][3:] == ["+0.00", "0.00"]
    fids = {k: fd(torch.from_numpy(x)) for k, x in runs.items()}
    assert float(rows[1][3]) == pytest.approx(fids["1_wider"] - fids["0_base"], abs=0.006)
    # the same samples, scaled: the difference is far surer than either run's own FID
    assert float(rows[1][4]) < 0.5 * float(rows[1][2])
    np.savez(tmp_path / "sweep" / "1_wider" / "features.npz", features=z[:10].astype(np.float32),
             ref_stats=np.array(str(tmp_path / "other.npz")), fid=np.float64(0))
    with pytest.raises(SystemExit, match="different reference statistics"):
        run(report, capsys, "fid_diff", str(tmp_path / "sweep"))
    with pytest.raises(SystemExit, match="save_features=true"):
        run(report, capsys, "fid_diff", str(tmp_path / "nothing"))


def test_fid_diff_pairs_each_run_with_its_own_base(report, tmp_path, capsys):
    from fewstep.metrics.fid import FrechetToReference, RefStats

    g = np.random.default_rng(1)
    ref = RefStats(mu=np.zeros(3), cov=np.eye(3), n=10000, pr_features=np.zeros((2, 3)))
    ref_path = ref.save(tmp_path / "ref.npz")
    fd = FrechetToReference(ref.mu, ref.cov)
    z = g.normal(size=(400, 3))
    runs = {"a0": 1.2 * z, "a1": 1.3 * z, "b0": 0.5 + z, "b1": 0.4 + z}
    for name, x in runs.items():
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "features.npz", features=x.astype(np.float32),
                 ref_stats=np.array(str(ref_path)), fid=np.float64(fd(torch.from_numpy(x))))
    out = run(report, capsys, "fid_diff", "--pairs", *(str(tmp_path / n) for n in runs))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")][1:]
    assert [(r[0], r[2]) for r in rows] == [("a0", "a1"), ("b0", "b1")]
    fids = {k: fd(torch.from_numpy(x)) for k, x in runs.items()}
    for r, (base, other) in zip(rows, [("a0", "a1"), ("b0", "b1")]):
        assert float(r[4]) == pytest.approx(fids[other] - fids[base], abs=0.006) and float(r[5]) > 0
    assert float(rows[1][4]) < 0 < float(rows[0][4])          # the shift toward the reference lowers the FID
    with pytest.raises(SystemExit, match="two at a time"):
        run(report, capsys, "fid_diff", "--pairs", str(tmp_path / "a0"))
    with pytest.raises(SystemExit, match="one run folder"):
        run(report, capsys, "fid_diff", "--pairs", str(tmp_path), str(tmp_path / "a0"))


def test_interaction_of_a_factorial_bootstraps_its_contrasts_jointly(report, tmp_path, capsys):
    """Against N(0, I) the FID of s z + m is d ((s - 1)^2 + m^2) up to sampling noise: a scale and a shift add
    up, so the interaction of a 2 x 2 factorial (scale 1.2 -> 1.4, shift 0 -> 0.3) is near 0, and its joint
    bootstrap s.e. is below the bound the sum of the three contrasts' s.e. would give."""
    import json

    from fewstep.metrics.fid import FrechetToReference, RefStats

    g = np.random.default_rng(2)
    ref = RefStats(mu=np.zeros(3), cov=np.eye(3), n=10000, pr_features=np.zeros((2, 3)))
    ref_path = ref.save(tmp_path / "ref.npz")
    fd = FrechetToReference(ref.mu, ref.cov)
    z = g.normal(size=(600, 3))
    cells = {("1.0", None): 1.2 * z, ("0.8", None): 1.4 * z, ("1.0", "deepcache"): 1.2 * z + 0.3,
             ("0.8", "deepcache"): 1.4 * z + 0.3}
    rows = []
    for i, ((rho, cache), x) in enumerate(cells.items()):
        (tmp_path / "f" / str(i)).mkdir(parents=True)
        np.savez(tmp_path / "f" / str(i) / "features.npz", features=x.astype(np.float32),
                 ref_stats=np.array(str(ref_path)), fid=np.float64(fd(torch.from_numpy(x))))
        rows.append({"job": str(i), "rho_bottom": float(rho), "cache": cache, "fid": 0.0})
    write_sweep(tmp_path / "f_sweep", rows)
    for r in rows:                                  # the job folders next to the summary
        (tmp_path / "f" / r["job"]).rename(tmp_path / "f_sweep" / r["job"])
    out = run(report, capsys, "interaction", str(tmp_path / "f_sweep"), "--factors", "rho_bottom", "cache",
              "--out", str(tmp_path / "i.json"))
    res = json.loads((tmp_path / "i.json").read_text())
    fid = {k: fd(torch.from_numpy(x.astype(np.float32))) for k, x in cells.items()}
    base = fid[("1.0", None)]
    assert res["on"] == {"rho_bottom": report.fmt(0.8), "cache": "deepcache"}
    assert res["off"] == {"rho_bottom": report.fmt(1.0), "cache": "none"}
    assert res["single"]["rho_bottom"][0] == pytest.approx(fid[("0.8", None)] - base, rel=1e-9)
    assert res["single"]["cache"][0] == pytest.approx(fid[("1.0", "deepcache")] - base, rel=1e-9)
    assert res["all"][0] == pytest.approx(fid[("0.8", "deepcache")] - base, rel=1e-9)
    inter, inter_se = res["interaction"]
    assert inter == pytest.approx(res["all"][0] - res["sum_of_singles"], abs=1e-9)
    assert abs(inter) < 3 * inter_se < 0.1 * abs(res["sum_of_singles"])
    assert inter_se < res["single"]["rho_bottom"][1] + res["single"]["cache"][1] + res["all"][1]
    assert "| all minus the sum of the singles" in out
    assert run(report, capsys, "interaction", str(tmp_path / "i.json")) == out       # the JSON prints the same table
    # one factor of the two, the other held at its base level by --where
    run(report, capsys, "interaction", str(tmp_path / "f_sweep"), "--factors", "cache", "--where", "rho_bottom=0.800",
        "--out", str(tmp_path / "c.json"))
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["single"]["cache"][0] == pytest.approx(fid[("0.8", "deepcache")] - fid[("0.8", None)], rel=1e-9)
    (tmp_path / "f_sweep" / "summary.csv").write_text(pd.DataFrame(rows[:3]).to_csv(index=False))
    with pytest.raises(SystemExit, match="no run with only rho_bottom \\+ cache on"):
        run(report, capsys, "interaction", str(tmp_path / "f_sweep"), "--factors", "rho_bottom", "cache")


def fake_sweep(root: Path) -> Path:
    """A sweep folder as run.py -m leaves it: result files, and the big or local files an archive leaves out."""
    import json

    sweep = root / "multirun" / "s"
    rows = []
    for i, (sampler, steps, err) in enumerate([("ddim", 5, 0.17), ("dpmpp", 5, 0.005)]):
        job = sweep / f"{i}_sampler={sampler},sampler.steps={steps}"
        (job / ".hydra").mkdir(parents=True)
        (job / "metrics.json").write_text(json.dumps(dict(sampler=sampler, steps=steps, nfe=steps, cov_err=err)))
        (job / ".hydra" / "config.yaml").write_text(f"sampler:\n  name: {sampler}\n  steps: {steps}\n")
        (job / ".hydra" / "overrides.yaml").write_text(f"- sampler={sampler}\n- sampler.steps={steps}\n")
        (job / ".hydra" / "hydra.yaml").write_text("hydra:\n  run:\n    dir: /somewhere/local\n")
        for big in ("samples.npz", "features.npz", "nll_bpd.npz", "samples.png"):
            (job / big).write_bytes(b"\0" * 1000)
        (job / "wandb" / "run-1" / "files").mkdir(parents=True)
        (job / "wandb" / "run-1" / "files" / "metrics.json").write_text("{}")
        rows.append(dict(job=job.name, overrides=f"sampler={sampler} sampler.steps={steps}", sampler=sampler,
                         steps=steps, nfe=steps, cov_err=err))
    pd.DataFrame(rows).to_csv(sweep / "summary.csv", index=False)
    (sweep / "summary.md").write_text("| job |\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_archive_copies_only_the_small_result_files(report, tmp_path, capsys):
    sweep = fake_sweep(tmp_path)
    dest = tmp_path / "experiments" / "data" / "s"
    written = report.archive(sweep, dest)
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == sorted(written_rel := [str(p.relative_to(dest)) for p in written])
    assert files == sorted(["summary.csv"] + [f"{j}/{f}" for j in ("0_sampler=ddim,sampler.steps=5",
                                                                      "1_sampler=dpmpp,sampler.steps=5")
                                              for f in ("metrics.json", ".hydra/config.yaml", ".hydra/overrides.yaml")])
    assert len(written_rel) == 7 and "archived 2 jobs" in capsys.readouterr().out
    # the tables read the archive exactly as the sweep folder
    for argv in (["table", "--rows", "sampler", "--cols", "nfe", "--value", "cov_err"],
                 ["list", "--keys", "sweep", "job", "sampler", "steps", "cov_err"]):
        assert run(report, capsys, argv[0], str(dest), *argv[1:]) == run(report, capsys, argv[0], str(sweep), *argv[1:])
    # re-archived after a re-run: replaced whole, no stale job left behind
    import shutil

    shutil.rmtree(sweep / "1_sampler=dpmpp,sampler.steps=5")
    report.archive(sweep, dest)
    assert not (dest / "1_sampler=dpmpp,sampler.steps=5").exists() and (dest / "summary.csv").exists()
    # a folder that is not an earlier archive is never replaced; a large file is not a result file
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds files an archive does not"):
        report.archive(sweep, tmp_path / "other")
    (sweep / "0_sampler=ddim,sampler.steps=5" / "metrics.json").write_text("{}" + " " * report.ARCHIVE_MAX_BYTES)
    with pytest.raises(SystemExit, match="not a small result file"):
        report.archive(sweep, dest)
    with pytest.raises(SystemExit, match="no metrics.json"):
        report.archive(tmp_path / "other", tmp_path / "x")


def test_skipnorms_reads_every_skip_and_evaluation_of_an_archived_run(report, tmp_path, capsys):
    """task=skip_norms' per-evaluation table travels with the archive, and `report.py skipnorms` counts the
    (skip, evaluation) pairs with prop >= 1 per run and variant and names where the largest one is."""
    job = tmp_path / "sweep" / "0_sampler=heun"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("sampler:\n  name: heun\n  steps: 5\nskip:\n  name: linear\n  rho_bottom: 0.8\n")
    (job / "metrics.json").write_text("{}")
    rows = [dict(variant=v, step=k, sampler_step=k // 2, t=800 - 100 * k, depth=i, level=i,
                 prop=(1.25 if (k, i) == (3, 2) else 1.0 if (k, i) == (1, 0) else 0.5) * (0.9 if v == "linear" else 1))
            for v in ("plain", "linear") for k in range(4) for i in range(3)]
    pd.DataFrame(rows).to_csv(job / "skip_norms.csv", index=False)
    (tmp_path / "sweep" / "summary.csv").write_text("job\n0_sampler=heun\n")
    dest = tmp_path / "experiments" / "data" / "norms"
    report.archive(tmp_path / "sweep", dest)
    assert (dest / "0_sampler=heun" / "skip_norms.csv").read_bytes() == (job / "skip_norms.csv").read_bytes()
    capsys.readouterr()
    out = run(report, capsys, "skipnorms", str(dest), "--out", str(tmp_path / "norms.png"))
    assert "| heun 5 steps | plain | 4 | 3 | 2 of 12 | 1.250 (i2, step 1, t 500) | 0.500 |" in out
    assert "| heun 5 steps | linear (rho_bottom 0.800) | 4 | 3 | 1 of 12 | 1.125 (i2, step 1, t 500) | 0.450 |" in out
    assert (tmp_path / "norms.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no skip_norms.csv"):
        report.skip_norm_rows([tmp_path / "sweep" / "nothing"])


def test_committed_data_holds_only_small_result_files(report):
    # experiments/data/ is for what `report.py archive` copies, and the JSON `report.py interaction --out`
    # writes from the features it reads: no samples, features, images or logs
    allowed = {Path(a).name for a in report.ARCHIVED} | {"summary.csv"}
    files = [p for p in (ROOT / "experiments" / "data").rglob("*") if p.is_file()]
    assert files, "experiments/data/ holds no archived sweep"
    for p in files:
        assert p.name in allowed or p.name.endswith("_interaction.json"), \
            f"not a result file an archive holds: {p.relative_to(ROOT)}"
        assert p.stat().st_size <= report.ARCHIVE_MAX_BYTES, f"too large for a result file: {p.relative_to(ROOT)}"


def test_build_readme_finds_the_paths_a_command_reads(build_readme):
    inputs = build_readme.inputs
    assert inputs("python experiments/report.py list multirun/a multirun/rho_sde* --keys fid") == \
        ["multirun/a", "multirun/rho_sde*"]
    assert inputs('python experiments/report.py list "multirun/s/10_logger=none,sampler=dpmpp,skip.rho_bottom=1.0" '
                  '--sort rho_top') == ["multirun/s/10_logger=none,sampler=dpmpp,skip.rho_bottom=1.0"]
    assert inputs("python experiments/report.py plot experiments/data/s --x a --out experiments/figures/f.png "
                  "> /dev/null") == ["experiments/data/s"]
    assert inputs("python -c \"import json; m = json.load(open('train_runs/t/metrics.json')); print(m['a'] / 2)\"") \
        == ["train_runs/t/metrics.json"]
    assert inputs("python -c \"from fewstep.strategies.cache import nonuniform_full_steps as nu; print(nu(20, 2))\"") == []
    assert build_readme.missing_data("python experiments/report.py table experiments/data/no_such_sweep") == \
        ["experiments/data/no_such_sweep"]


def test_build_readme_check_committed_reruns_what_committed_data_can(build_readme, tmp_path, monkeypatch, capsys):
    template = "\n".join(["# t", "@@ python -c \"print(open('experiments/data/s/v.txt').read().strip())\"", "mid",
                          "@@ python -c \"print(open('multirun/gone/v.txt').read())\"", "end"]) + "\n"
    (tmp_path / "experiments" / "data" / "s").mkdir(parents=True)
    (tmp_path / "experiments" / "data" / "s" / "v.txt").write_text("| 1.23 |\n")
    for name, text in (("ROOT", tmp_path), ("TEMPLATE", tmp_path / "template.md"), ("README", tmp_path / "README.md")):
        monkeypatch.setattr(build_readme, name, text)
    (tmp_path / "template.md").write_text(template)
    shown = build_readme.block(template.splitlines()[1][3:], "| 1.23 |")
    lost = build_readme.block(template.splitlines()[3][3:], "what the lost sweep printed")
    readme = f"# t\n{shown}\nmid\n{lost}\nend\n"
    (tmp_path / "README.md").write_text(readme)
    assert build_readme.main(["--check", "--committed"]) == 0
    out = capsys.readouterr().out
    assert "re-running the 1 commands whose data is committed; keeping the committed output of 1" in out
    assert "template line 4: multirun/gone/v.txt not committed" in out and "up to date" in out
    (tmp_path / "README.md").write_text(readme.replace("1.23", "1.24"))    # a table drifts from its data
    assert build_readme.main(["--check", "--committed"]) == 1
    assert "-| 1.24 |\n+| 1.23 |" in capsys.readouterr().out
    (tmp_path / "README.md").write_text(readme.replace("lost sweep", "lost sweeps"))   # kept as it stands
    assert build_readme.main(["--check", "--committed"]) == 0


TEMPLATE_COMMANDS = {}                          # command -> its first line in the template
for _n, _line in enumerate((ROOT / "experiments" / "README.template.md").read_text().splitlines(), 1):
    if _line.startswith("@@ "):
        TEMPLATE_COMMANDS.setdefault(_line[3:], _n)


@pytest.fixture(scope="module")
def readme_outputs(build_readme):
    """Each template command's output as it stands in the committed experiments/README.md."""
    return build_readme.committed_outputs(build_readme.TEMPLATE.read_text(), build_readme.README.read_text()).outputs


@pytest.mark.parametrize("command", list(TEMPLATE_COMMANDS), ids=[f"template_line_{n}" for n in TEMPLATE_COMMANDS.values()])
def test_readme_table_matches_its_committed_data(build_readme, readme_outputs, command, tmp_path):
    # CI's check of experiments/README.md: a command whose data is committed (experiments/data/) is re-run and
    # must print what the README shows at its place. One whose data is not (the sweeps made before
    # experiments/data/ existed; `build_readme.py --committed` lists them) cannot be re-run here: its output
    # must still stand in the README where the template puts it, as it was committed
    missing = build_readme.missing_data(command)
    if missing:
        assert command in readme_outputs, f"template line {TEMPLATE_COMMANDS[command]}: its committed output is gone"
        return
    committed = readme_outputs[command]
    assert committed is not None, f"the README's text for this command is ambiguous (see committed_outputs): {command}"
    text, _ = build_readme.render(build_readme.MARK + command + "\n", tmp_path)   # figures drawn aside
    assert text == committed + "\n", f"experiments/README.md differs from what its committed data gives: {command}"


def test_some_readme_tables_are_checked_against_committed_data(build_readme):
    checked = [c for c in TEMPLATE_COMMANDS if not build_readme.missing_data(c)]
    assert any("experiments/data/gmm_steps" in c for c in checked), "no README table is made from committed data"


def test_denoise_prints_relative_changes_per_t_and_rho(report, tmp_path, capsys):
    import json

    for j, rho in enumerate((0.5, 0.8)):
        job = tmp_path / "s" / str(j)
        job.mkdir(parents=True)
        rows = {}
        for t in (100, 500):
            rows[f"plain/t{t}"] = {"pixel_eps": 0.2, "feature": 4.0}
            rows[f"linear/t{t}"] = {"d_pixel_eps": 0.02 * (1 + j), "d_pixel_eps_se": 0.002,
                                    "d_feature": -0.4 * t / 500, "d_feature_se": 0.04}
        (job / "metrics.json").write_text(json.dumps(dict(variants=["plain", "linear"], loss_t=[100, 500], rows=rows,
                                                          rho_bottom=rho, skip="linear")))
    out = run(report, capsys, "denoise", str(tmp_path / "s"))
    pixel, feature = out.split("feature loss")
    assert "| t | rho_bottom=0.5 | rho_bottom=0.8 |" in pixel
    assert "| 100 | +10.0 +- 1.0 | +20.0 +- 1.0 |" in pixel
    assert "| 500 | -10.0 +- 1.0 | -10.0 +- 1.0 |" in feature and "| 100 | -2.0 +- 1.0 |" in feature


def test_a_diffusers_run_is_labelled_by_its_scheduler(report, tmp_path, monkeypatch):
    from conftest import compose_cfg
    from fewstep.tasks import dispatch

    run_dir = tmp_path / "unipc"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    result = dispatch(compose_cfg(["sampler=diffusers", "sampler.scheduler=UniPCMultistepScheduler", "sampler.steps=3",
                                   "n_samples=20", "batch_size=20", "logger=none"]))
    assert result["scheduler"] == "UniPCMultistepScheduler"
    df = report.load([str(tmp_path)])
    assert list(df["sampler_label"]) == ["diffusers UniPCMultistep"]
