"""The notebooks run top to bottom (smoke settings) and are committed without outputs."""

import os
import re

import nbformat
import pytest

from repo import ROOT

COLABS = os.path.join(ROOT, "colabs")


def run_notebook(name, timeout=900):
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
    os.environ["FDRL_SMOKE"] = "1"
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": COLABS}}).execute()
    finally:
        os.environ.pop("FDRL_SMOKE", None)
    return nb


@pytest.mark.parametrize("name", ["01_f_divergences.ipynb", "02_align_smollm2.ipynb", "03_compare_divergences.ipynb"])
def test_committed_without_outputs(name):
    nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name} has stale outputs"


@pytest.mark.parametrize("name", ["01_f_divergences.ipynb",
                                  pytest.param("03_compare_divergences.ipynb", marks=pytest.mark.slow)])
def test_notebook_runs(name):
    nb = run_notebook(name)
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 2
    if name.startswith("01"):
        # The QRS cell: keeping 10% of a proposal's draws brings it closer to p (TV(p, p_β) ≤ TV(p, q)).
        text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        rows = re.findall(r"q = (\S+): TV\(p, q\) = ([0-9.]+); keeping 10% of its draws, TV\(p, p_β\) = ([0-9.]+)", text)
        assert len(rows) >= 4 and rows[0][0] == "a", text[-2000:]
        assert all(float(tv_beta) < float(tv_q) for _, tv_q, tv_beta in rows), rows


@pytest.mark.slow
def test_align_smollm2_notebook_runs():
    nb = run_notebook("02_align_smollm2.ipynb")
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "→" in text
