"""examples/quantization.ipynb runs top to bottom in a fresh kernel and draws its plots
(per-layer error of each FireQ smoothing step; the notebook checks its own figures)."""

from __future__ import annotations

import pytest

pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from notebook_check import check_committed, run_and_check  # noqa: E402


def test_committed_quantization_notebook_is_the_scripts_output():
    check_committed("quantization", plots=3)


def test_quantization_notebook_runs_and_draws_its_plots():
    run_and_check("quantization", 3, ["last-layer stream error",
                                      "LayerErrors(5 steps x 30 layers"])
