"""Jitted model steps over the shared paged pool, one compiled function per shape bucket.

``step(params, pool, batch) -> (next tokens, pool, aux)`` is a pure function of the model's
static config, compute dtype and KV cache description; the pool is donated. Functions
are cached by those static parts, so two tenants with the same shapes and formats share
their compilations. ``traces`` counts how many times a step was traced (compiled), which
the engine's warm-up and tests use to prove nothing compiles after warm-up.

With a ``mesh`` (a 1-D ``"tp"`` mesh, ``engine.sharding``) the weights are sharded
tensor-parallel, the pool is replicated on the mesh and the same step runs under GSPMD;
the step pins the returned pool to the pool's sharding so the donated buffer keeps its
layout from step to step. Without a mesh nothing changes.

Log-probabilities are separate small functions run only for batches that ask for them:
``LOGPROBS`` over the step's last-token logits (generated tokens), and the runner's
``prompt_logprobs`` over the step's final hidden states (prompt tokens, OpenAI's
``echo``), so a step that needs none pays nothing for them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from fineserve_jax.config import ModelConfig
from fineserve_jax.engine.sharding import param_shardings, pool_sharding
from fineserve_jax.model.paged import PagedKVCache, PagedKVMeta
from fineserve_jax.model.transformer import forward, lm_head
from fineserve_jax.runner import backend_weights
from fineserve_jax.sampling import MAX_LOGPROBS, SamplingArrays, sample


@dataclass(frozen=True)
class StepBatch:
    """Host arrays of one step (numpy); shapes are a compiled bucket (B, T, P)."""

    tokens: np.ndarray  # i32[B, T]
    positions: np.ndarray  # i32[B, T]; -1 = padding
    seq_lens: np.ndarray  # i32[B] KV length after the step; 0 = padding row
    page_table: np.ndarray  # i32[B, P]
    logits_idx: np.ndarray  # i32[B] which of the T tokens predicts the next one
    sampling: SamplingArrays
    mode: str  # sampler of the batch (``sampling.batch_mode``)

    @property
    def shape(self) -> tuple[int, int, int]:
        B, T = self.tokens.shape
        return B, T, self.page_table.shape[1]


class _TracedStep:
    """A jitted step that counts its traces (one per compiled shape)."""

    def __init__(self, cfg: ModelConfig, dtype, kv: PagedKVCache, query_fp8: bool = False,
                 mesh: Mesh | None = None):
        self.traces = 0
        pinned = None if mesh is None else pool_sharding(mesh)

        def step(params, pool, tokens, positions, seq_lens, page_table, logits_idx):
            self.traces += 1  # runs at trace time only
            meta = PagedKVMeta(positions, seq_lens, page_table)
            h, pool = forward(cfg, params, tokens, positions, kv, pool, meta, dtype, query_fp8)
            if pinned is not None:  # GSPMD may not pick the input's layout for the output
                pool = jax.lax.with_sharding_constraint(pool, pinned)
            last = jnp.take_along_axis(h, logits_idx[:, None, None], axis=1)[:, 0]  # (B, D)
            return lm_head(cfg, params, last), pool, h  # f32[B, vocab], pool, [B, T, D]

        self.fn = jax.jit(step, donate_argnames=("pool",))


@functools.lru_cache(maxsize=None)
def traced_step(cfg: ModelConfig, dtype: str, kv: PagedKVCache,
                query_fp8: bool = False, mesh: Mesh | None = None) -> _TracedStep:
    return _TracedStep(cfg, jnp.dtype(dtype), kv, query_fp8, mesh)


class PagedRunner:
    """One model's weights and its compiled steps over the device pool.

    ``device``: the one device of the weights (default: JAX's). ``mesh``: instead, a 1-D
    ``"tp"`` mesh (``engine.sharding.tp_mesh``) the weights are sharded over
    tensor-parallel; the pool passed to ``step`` must then be ``new_pool(..., mesh=mesh)``.
    """

    def __init__(self, cfg: ModelConfig, params, dtype: str, kv: PagedKVCache,
                 query_fp8: bool = False, device: jax.Device | None = None,
                 mesh: Mesh | None = None):
        if device is not None and mesh is not None:
            raise ValueError("PagedRunner: give a device or a mesh, not both")
        self.cfg = cfg
        self.dtype = str(jnp.dtype(dtype))
        self.kv = kv
        self.query_fp8 = query_fp8
        self.mesh = mesh
        where = device if mesh is None else param_shardings(params, mesh)
        self.params = backend_weights(jax.device_put(params, where), jnp.dtype(dtype))
        self._step = traced_step(cfg, self.dtype, kv, query_fp8, mesh)

    @property
    def traces(self) -> int:
        return self._step.traces

    def step(self, pool: jax.Array, b: StepBatch) -> tuple[jax.Array, jax.Array, StepAux]:
        """-> (next token i32[B] on device, new pool, aux). ``pool`` is donated."""
        logits, pool, h = self._step.fn(self.params, pool, b.tokens, b.positions, b.seq_lens,
                                        b.page_table, b.logits_idx)
        return SAMPLER.fn(logits, b.sampling, mode=b.mode), pool, StepAux(logits, h)

    @property
    def head_weight(self) -> jax.Array:
        """[vocab, D]: the output projection (the embedding when tied)."""
        return self.params["embed"] if self.cfg.tie_word_embeddings else self.params["lm_head"]

    def prompt_logprobs(self, aux: "StepAux", targets: np.ndarray) -> TopLogprobs:
        """Log-probabilities of ``targets`` i32[B, T] (the token after each fed one) from
        the step's hidden states, with the ``MAX_LOGPROBS`` best alternatives."""
        return PROMPT_LOGPROBS.fn(self.head_weight, aux.hidden, targets)


@dataclass(frozen=True)
class StepAux:
    """Device outputs of a step beyond the sampled tokens (read only when asked for)."""

    logits: jax.Array  # f32[B, vocab] at each row's last fed token
    hidden: jax.Array  # [B, T, D] final-norm hidden state of every fed token


class TopLogprobs(NamedTuple):
    """Log-probabilities (log-softmax of the raw logits, before temperature or filters)."""

    logprob: jax.Array  # f32[...] of the chosen or target token
    rank: jax.Array  # i32[...] its 1-based rank in the distribution
    top_ids: jax.Array  # i32[..., MAX_LOGPROBS] best tokens, most likely first
    top_logprobs: jax.Array  # f32[..., MAX_LOGPROBS]



def top_logprobs(logits: jax.Array, targets: jax.Array) -> TopLogprobs:
    """logits f32[..., V], targets i32[...] -> ``TopLogprobs``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    rank = 1 + jnp.sum(logp > lp[..., None], axis=-1).astype(jnp.int32)
    top_lp, top_ids = jax.lax.top_k(logp, MAX_LOGPROBS)
    return TopLogprobs(lp, rank, top_ids.astype(jnp.int32), top_lp)


class _Traced:
    """A jitted function that counts its traces."""

    def __init__(self, fn):
        self.traces = 0

        def counted(*args):
            self.traces += 1
            return fn(*args)

        self.fn = jax.jit(counted)


def _prompt_logprobs(head_w, hidden, targets):
    logits = jax.lax.dot_general(hidden.astype(head_w.dtype), head_w,
                                 (((2,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return top_logprobs(logits, targets)


LOGPROBS = _Traced(top_logprobs)  # per batch size: generated tokens' logprobs
PROMPT_LOGPROBS = _Traced(_prompt_logprobs)  # per (rows, tokens, head): prompt logprobs


class _TracedSampler:
    """Sampling compiled apart from the model step: per (batch, vocab, sampler), shared by
    every model, so the model's shape buckets don't multiply by the samplers."""

    def __init__(self):
        self.traces = 0

        def fn(logits, sampling, mode):
            self.traces += 1
            return sample(logits, sampling, mode)

        self.fn = jax.jit(fn, static_argnames=("mode",))


SAMPLER = _TracedSampler()
