"""examples/*.ipynb run top to bottom in a fresh kernel, and draw their plots.

Each notebook is rebuilt from its script (examples/make_<name>.py; the committed .ipynb
must be that script's output) and executed with nbclient, from the repository root, with a
time limit per cell. The quickstart's fireq-g32 checkpoint comes from the checkpoint cache
(quantized on the first run only, about a minute on 2 CPU cores).
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
# name -> (plots drawn, text its outputs must contain)
NOTEBOOKS = {
    "quickstart": (2, ["Paris", "16 requests"]),  # both models answer; the burst ran
    "quantization": (3, ["last-layer stream error", "LayerErrors(5 steps x 30 layers"]),
}


def _maker(name):
    spec = importlib.util.spec_from_file_location(
        f"make_{name}", ROOT / "examples" / f"make_{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pngs(nb) -> list[bytes]:
    return [base64.b64decode(o.data["image/png"]) for c in nb.cells if c.cell_type == "code"
            for o in c.outputs if "image/png" in o.get("data", {})]


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_committed_notebook_is_the_scripts_output(name):
    committed = nbformat.read(ROOT / "examples" / f"{name}.ipynb", as_version=4)
    built = _maker(name).build()
    assert [(c.cell_type, c.source) for c in committed.cells] == \
        [(c.cell_type, c.source) for c in built.cells]
    code = [c for c in committed.cells if c.cell_type == "code"]
    # saved executed, in order, without errors, with its plots
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert len(_pngs(committed)) == NOTEBOOKS[name][0]


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_and_draws_its_plots(name):
    plots, texts = NOTEBOOKS[name]
    nb = _maker(name).build()
    nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors  # nbclient raises on the first error; belt and braces
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                   for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for t in texts:
        assert t in text
    pngs = _pngs(nb)
    assert len(pngs) == plots
    for png in pngs:
        assert png.startswith(PNG) and len(png) > 5_000
