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
