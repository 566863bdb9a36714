"""examples/quickstart.ipynb runs top to bottom in a fresh kernel and draws its plots.

Rebuilt from examples/make_quickstart.py (the committed .ipynb must be that script's
output) and executed with nbclient. Its fireq-g32 checkpoint comes from the checkpoint
cache (quantized on the first run only). The quantization notebook has a file of its own
(tests/test_notebooks_quantization.py), so the two can run on different workers.
"""

from __future__ import annotations

import pytest

pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from notebook_check import check_committed, run_and_check  # noqa: E402


def test_committed_quickstart_is_the_scripts_output():
    check_committed("quickstart", plots=2)


def test_quickstart_runs_and_draws_its_plots():
    run_and_check("quickstart", 2, ["Paris", "16 requests"])  # both answer; the burst ran
