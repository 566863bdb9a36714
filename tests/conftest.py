"""Shared fixtures: the real packaged model (loaded once) and tiny HF checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def smollm2_f32():
    from fineserve_jax import LLM

    return LLM("smollm2-135m", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def smollm2_bf16():
    from fineserve_jax import LLM

    return LLM("smollm2-135m", dtype="bfloat16", progress=False)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_f32):
    return smollm2_f32.tokenizer


# The longest files (measured with --durations on 2 cores) run first, so that the two
# xdist workers (--dist loadfile hands out files in collection order) finish together.
LONGEST_FIRST = ("test_live_server.py", "test_ray_cluster.py", "test_notebooks.py",
                 "test_notebooks_quantization.py", "test_quant_model.py", "test_smollm2.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: order kept within
