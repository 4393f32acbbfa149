"""notebooks/quickstart.ipynb executes top to bottom (small settings) and produces its plot."""
from __future__ import annotations

import pytest

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_notebook_is_committed_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("FEWSTEP_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("FEWSTEP_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "fid_vs_rho.png").stat().st_size > 0
    assert len(list((tmp_path / "rho_sweep").glob("*/metrics.json"))) == 3
    assert (tmp_path / "rho_sweep" / "summary.csv").exists()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "best rho_bottom" in text
