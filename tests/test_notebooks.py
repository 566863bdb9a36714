"""examples/quickstart.ipynb runs top to bottom in a fresh kernel, and draws its plots.

The notebook is rebuilt from examples/make_quickstart.py (the committed .ipynb must be
that script's output) and executed with nbclient, from the repository root, with a time
limit per cell. Its fireq-g32 checkpoint comes from the checkpoint cache (quantized on
the first run only, about 1.5 min on 2 CPU cores).
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
CELL_TIMEOUT_S = 300
PNG = b"\x89PNG\r\n\x1a\n"


def _maker():
    spec = importlib.util.spec_from_file_location(
        "make_quickstart", ROOT / "examples" / "make_quickstart.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_notebook_is_the_scripts_output():
    committed = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    built = _maker().build()
    assert [(c.cell_type, c.source) for c in committed.cells] == \
        [(c.cell_type, c.source) for c in built.cells]
    code = [c for c in committed.cells if c.cell_type == "code"]
    # saved executed, in order, with its plots
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert sum("image/png" in o.get("data", {}) for c in code for o in c.outputs) == 2


def test_quickstart_runs_and_draws_its_plots():
    nb = _maker().build()
    nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors  # nbclient raises on the first error; belt and braces
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream")
    assert "Paris" in text  # both models answer the first prompt
    assert "16 requests" in text
    pngs = [base64.b64decode(o.data["image/png"]) for c in nb.cells
            if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 2  # pool timeline, attainment
    for png in pngs:
        assert png.startswith(PNG) and len(png) > 5_000
