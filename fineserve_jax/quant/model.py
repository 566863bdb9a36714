"""A whole model in a precision: calibrate, smooth, round every linear weight.

``quantize_model`` takes float32 params (as loaded) and a ``precisions.Precision``:

1. calibration on the packaged Wikipedia text (``SmoothingConfig.calib_*``) when the
   recipe scales keys (pre-/post-RoPE), from the unquantized model;
2. smoothing folded in (``smoothing.smooth``), plus the online key scale ``k_post``;
3. each linear weight (q, k, v, o, gate, up, down of every layer) replaced by its
   quantized type (``Int4Weight`` / ``Fp8Weight``); embeddings, norms, the LM head and
   ``k_post`` stay as they are (norms and embeddings in the serving dtype).

The result is a params tree the model steps run directly: ``linear`` dispatches on the
weight types.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from fineserve_jax.config import ModelConfig
from fineserve_jax.precisions import Precision, get_precision
from fineserve_jax.quant.smoothing import KeyStats, key_stats, smooth

LINEARS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def quantize_linears(params: dict, precision: Precision) -> dict:
    """Every layer's linear weights rounded to ``precision.weights`` (others untouched)."""
    from fineserve_jax.quant import quantize_fp8_weight, quantize_int4

    r = precision.weights
    if r.kind == "none":
        return params
    act = "fp8" if precision.act_fp8 else None
    layers = dict(params["layers"])
    for n in LINEARS:
        w = jnp.asarray(layers[n], jnp.float32)
        if r.kind == "fp8":
            layers[n] = quantize_fp8_weight(w, act=act)
        else:
            layers[n] = quantize_int4(w, group=r.group, symmetric=r.symmetric,
                                      scale_dtype=r.scale_dtype, zero=r.zero,
                                      fit_grid=r.fit_grid, act=act, pow2=r.pow2)
    return {**params, "layers": layers}


def is_quantized_leaf(x) -> bool:
    from fineserve_jax.quant import Fp8Weight, Int4Weight

    return isinstance(x, (Int4Weight, Fp8Weight))


def cast_unquantized(params: dict, dtype) -> dict:
    """Floating arrays outside the quantized weights and ``k_post``, cast to ``dtype``."""
    dt = jnp.dtype(dtype)

    def cast(a):
        if is_quantized_leaf(a) or not jnp.issubdtype(np.asarray(a).dtype, jnp.floating):
            return a
        return np.asarray(a).astype(dt)

    layers = {k: (v if k == "k_post" else jax.tree.map(cast, v, is_leaf=is_quantized_leaf))
              for k, v in params["layers"].items()}
    rest = {k: jax.tree.map(cast, v, is_leaf=is_quantized_leaf)
            for k, v in params.items() if k != "layers"}
    return {**rest, "layers": layers}


def abstract_quantized(cfg: ModelConfig, precision: str | Precision, dtype) -> dict:
    """The ShapeDtypeStruct tree of a model quantized in ``precision``: the restore target
    of a quantized checkpoint (computed by tracing the quantizer, nothing is rounded)."""
    from fineserve_jax.model.params import abstract_params

    p = get_precision(precision)
    f32 = abstract_params(cfg, jnp.float32)

    def build(params):
        params = quantize_linears(params, p)
        if p.smoothing is not None and p.smoothing.post_rope:
            L, H, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
            params = {**params, "layers": {**params["layers"],
                                           "k_post": jnp.ones((L, H, D), jnp.float32)}}
        return params

    tree = jax.eval_shape(build, f32)
    dt = jnp.dtype(dtype)

    def to_dtype(path, a):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        inside = any(isinstance(k, str) and k in LINEARS for k in keys) and p.quantized
        if inside or "k_post" in keys or not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        return jax.ShapeDtypeStruct(a.shape, dt)

    return jax.tree_util.tree_map_with_path(to_dtype, tree)


def calibration_sequences(tokenizer, start: int, tokens: int, seq_len: int) -> np.ndarray:
    """i32[tokens // seq_len, seq_len] from the packaged corpus at ``start``."""
    from fineserve_jax.eval import corpus_slice

    n = tokens // seq_len
    if n < 1:
        raise ValueError(f"calibration needs at least one sequence of {seq_len} tokens")
    return corpus_slice(tokenizer, start, n * seq_len).reshape(n, seq_len)


def quantize_model(cfg: ModelConfig, params: dict, precision: str | Precision, tokenizer=None,
                   *, dtype="bfloat16", stats: KeyStats | None = None, progress: bool = True
                   ) -> tuple[dict, dict]:
    """(params in ``precision``, report). ``params`` should be float32; the unquantized
    leaves come back in ``dtype``. ``stats`` skips calibration (else ``tokenizer`` is
    needed to read the corpus). The report has the calibration and timing figures."""
    p = get_precision(precision)
    t0 = time.perf_counter()
    report: dict = {"precision": p.name}
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    sm = p.smoothing
    if sm is not None:
        if sm.needs_calibration and stats is None:
            if tokenizer is None:
                raise ValueError(f"{p.name}: calibration needs the tokenizer (or stats=)")
            seqs = calibration_sequences(tokenizer, sm.calib_start, sm.calib_tokens,
                                         sm.calib_seq_len)
            stats = key_stats(cfg, params, seqs, progress=progress)
            report["calibration_tokens"] = int(seqs.size)
            report["calibration_s"] = round(time.perf_counter() - t0, 2)
        params = smooth(cfg, params, sm, stats)
    params = cast_unquantized(quantize_linears(params, p), dtype)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return params, report
