"""Sampling as a pure function: greedy, temperature, top-k, top-p, min-p, seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.sampling import (FILTERED, GREEDY, RANDOM, SamplingArrays, SamplingParams,
                                    batch_mode, filter_logits, sample)


def _arrays(params, seeds=None, steps=None):
    n = len(params)
    return SamplingArrays.build(params, seeds or list(range(n)), steps or [0] * n)


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (5, 100))
    s = _arrays([SamplingParams(temperature=0)] * 5)
    for mode in (GREEDY, RANDOM, FILTERED):
        np.testing.assert_array_equal(sample(logits, s, mode), jnp.argmax(logits, -1))


def test_filter_logits_matches_numpy_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 50)).astype(np.float32) * 3
    top_k = np.array([0, 1, 5, 0, 0, 7], np.int32)
    top_p = np.array([1.0, 1.0, 1.0, 0.5, 0.9, 0.8], np.float32)
    min_p = np.array([0.0, 0.0, 0.0, 0.0, 0.05, 0.1], np.float32)
    got = np.asarray(filter_logits(jnp.asarray(x), top_k, top_p, min_p))
    for r in range(6):
        order = np.argsort(-x[r])
        p = np.exp(x[r, order] - x[r].max())
        p /= p.sum()
        keep = np.ones(50, bool)
        if top_k[r]:
            keep[top_k[r]:] = False
        keep &= ((np.cumsum(p) - p) < top_p[r]) | (top_p[r] >= 1)
        keep &= p >= min_p[r] * p[0]
        expect = set(order[keep].tolist())
        assert set(np.flatnonzero(np.isfinite(got[r])).tolist()) == expect, r


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = jax.random.normal(jax.random.key(2), (4, 1000))
    params = [SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
              SamplingParams(temperature=0.7, min_p=1.0), SamplingParams(temperature=2.0, top_k=1)]
    got = sample(logits, _arrays(params), FILTERED)
    np.testing.assert_array_equal(got, jnp.argmax(logits, -1))


def test_seed_reproducible_and_independent_of_batch_position():
    logits = jax.random.normal(jax.random.key(3), (1, 500))
    sp = SamplingParams(temperature=1.0, top_p=0.9)
    alone = sample(logits, _arrays([sp], seeds=[42], steps=[7]), FILTERED)
    batch = jnp.concatenate([jax.random.normal(jax.random.key(4), (2, 500)), logits])
    s = _arrays([SamplingParams(temperature=0.5)] * 2 + [sp], seeds=[1, 2, 42], steps=[0, 0, 7])
    assert int(sample(batch, s, FILTERED)[2]) == int(alone[0])
    other_step = sample(logits, _arrays([sp], seeds=[42], steps=[8]), FILTERED)
    other_seed = [int(sample(logits, _arrays([sp], seeds=[s], steps=[7]), FILTERED)[0]) for s in range(20)]
    assert len(set(other_seed)) > 3 or int(other_step[0]) != int(alone[0])


def test_temperature_sampling_follows_softmax():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    logits = jnp.repeat(logits, 4000, axis=0)
    s = _arrays([SamplingParams(temperature=1.0)] * 4000, seeds=list(range(4000)))
    counts = np.bincount(np.asarray(sample(logits, s, RANDOM)), minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # Temperature 0.25 sharpens towards the argmax.
    s = _arrays([SamplingParams(temperature=0.25)] * 4000, seeds=list(range(4000)))
    assert np.mean(np.asarray(sample(logits, s, RANDOM)) == 0) > 0.85


def test_batch_mode_picks_cheapest_sampler():
    assert batch_mode([SamplingParams(temperature=0)]) == GREEDY
    assert batch_mode([SamplingParams(temperature=0), SamplingParams()]) == RANDOM
    assert batch_mode([SamplingParams(), SamplingParams(top_k=5)]) == FILTERED


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0),
                                 dict(top_p=1.5), dict(top_k=-2), dict(min_p=2.0),
                                 dict(stop=[""])])
def test_invalid_params_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)
