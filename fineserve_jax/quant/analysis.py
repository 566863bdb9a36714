"""Where quantization error enters, layer by layer, for each step of FireQ's smoothing.

``layer_errors`` takes a float32 model and a sequence of precisions (by default
``fireq_ablation()``: FireQ's recipe built up one smoothing step at a time) and measures,
for every layer, three relative errors ``||quantized - exact|| / ||exact||``:

* ``stream``: the residual stream after the layer, the whole quantized model (INT4 weights,
  FP8 activations, the precision's KV format and FP8 queries) against the float model; the
  error every earlier layer passed on is included.
* ``linears[name]``: one linear layer alone (W4A8: rounded weights, FP8 activations) on the
  inputs the float model gives it, against the float product. Smoothing changes both the
  weight and its input (scales folded into the producer), so each step is measured on its own
  smoothed model, whose float outputs equal the original's.
* ``keys``: the attention logits ``q.k`` of the layer with keys through the KV format and
  queries rounded to FP8 (when the precision does), against float keys and queries, over the
  causal pairs. Pre-/post-RoPE scaling acts here.

Everything is computed in float32, so the figures isolate rounding by the recipe from the
serving dtype. ``plots.plot_layer_errors`` draws them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fineserve_jax.config import ModelConfig
from fineserve_jax.precisions import PRECISIONS, Precision

LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def fireq_ablation() -> dict[str, Precision]:
    """FireQ's W4A8KV4 recipe built up one step at a time, label -> precision (the last is
    ``fireq`` itself): no smoothing and no power-of-two multiplier, then + channel-wise
    scaling, + the pow2 per-tensor multiplier, + pre-RoPE key scaling, + post-RoPE."""
    fq = PRECISIONS["fireq"]
    sm = fq.smoothing
    no_keys = dataclasses.replace(sm, pre_rope=False, post_rope=False)
    nopow2 = dataclasses.replace(fq.weights, pow2=False)
    return {
        "fireq: no smoothing, no pow2": fq.replace(name="fireq-ablation-0", weights=nopow2,
                                                   smoothing=None),
        "fireq: + channel-wise": fq.replace(name="fireq-ablation-1", weights=nopow2,
                                            smoothing=no_keys),
        "fireq: + pow2 per-tensor": fq.replace(name="fireq-ablation-2", smoothing=no_keys),
        "fireq: + pre-RoPE": fq.replace(name="fireq-ablation-3",
                                        smoothing=dataclasses.replace(sm, post_rope=False)),
        "fireq": fq,
    }


@dataclass(frozen=True)
class LayerErrors:
    """Relative errors per step and layer (rows: ``steps``; columns: layers)."""

    steps: tuple[str, ...]
    stream: np.ndarray  # f64[S, L] residual stream after each layer, whole model quantized
    linears: dict[str, np.ndarray]  # name -> f64[S, L] one W4A8 linear on its float inputs
    keys: np.ndarray  # f64[S, L] attention logits with the KV format's keys and FP8 queries
    tokens: int  # tokens the errors are measured on
    calibration_tokens: int  # tokens the key statistics came from (0: none needed)

    @property
    def num_layers(self) -> int:
        return self.stream.shape[1]

    def series(self, kind: str) -> np.ndarray:
        """f64[S, L] for ``kind``: "stream", "keys", a linear's name or "linears" (the
        mean over the seven linear layers)."""
        if kind == "stream":
            return self.stream
        if kind == "keys":
            return self.keys
        if kind == "linears":
            return np.mean([self.linears[n] for n in LINEAR_NAMES], axis=0)
        if kind in self.linears:
            return self.linears[kind]
        raise ValueError(f"unknown kind {kind!r}; choose stream, keys, linears or one of "
                         f"{list(LINEAR_NAMES)}")

    def summary(self) -> list[dict]:
        """One row per step: the mean over layers of each error, and the last layer's
        stream error (what reaches the LM head)."""
        rows = []
        for i, s in enumerate(self.steps):
            row = {"step": s, "stream_last": float(self.stream[i, -1]),
                   "stream_mean": float(self.stream[i].mean()),
                   "keys_mean": float(self.keys[i].mean())}
            row.update({f"{n}_mean": float(self.linears[n][i].mean()) for n in LINEAR_NAMES})
            rows.append(row)
        return rows

    def table(self) -> str:
        from fineserve_jax.bench.common import format_table

        header = ["step", "stream (last layer)", "linears (mean)", "keys (mean)"]
        lin = self.series("linears")
        rows = [[s, f"{self.stream[i, -1]:.4f}", f"{lin[i].mean():.4f}",
                 f"{self.keys[i].mean():.4f}"] for i, s in enumerate(self.steps)]
        foot = [(f"relative errors, {self.num_layers} layers, {self.tokens} tokens; key "
                 f"statistics from {self.calibration_tokens} calibration tokens")]
        return format_table(header, rows, foot)

    def __repr__(self) -> str:
        last = ", ".join(f"{s!r}: {self.stream[i, -1]:.4f}" for i, s in enumerate(self.steps))
        return (f"LayerErrors({len(self.steps)} steps x {self.num_layers} layers, "
                f"{self.tokens} tokens; last-layer stream error {{{last}}})")

    def to_dict(self) -> dict:
        return {"steps": list(self.steps), "tokens": self.tokens,
                "calibration_tokens": self.calibration_tokens,
                "stream": self.stream.tolist(), "keys": self.keys.tolist(),
                "linears": {n: v.tolist() for n, v in self.linears.items()}}


# ----------------------------------------------------------------- computation
def _causal_mask(T: int) -> jax.Array:
    return jnp.tril(jnp.ones((T, T), bool))


def _sq(a, b):
    """(sum (a - b)^2, sum b^2) in float32."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.sum((a - b) ** 2), jnp.sum(b ** 2)


def _per_layer(cfg: ModelConfig, fp: dict, qp: dict, inputs, mids, positions, kv_fmt,
               query_fp8: bool):
    """Squared errors per layer: linears {name: (err, ref)}, keys (err, ref). ``fp``/``qp``
    the float and quantized params of one smoothed model; ``inputs``/``mids`` [L, B, T, D]
    the float residual stream entering each layer and after its attention."""
    from fineserve_jax.linear import linear
    from fineserve_jax.model.transformer import (
        apply_k_post,
        apply_rope,
        rms_norm,
        rope_tables,
    )
    from fineserve_jax.quant.fp8 import fake_quant_per_token

    eps, D = cfg.rms_norm_eps, cfg.head_dim
    H, Hkv = cfg.num_heads, cfg.num_kv_heads
    cos, sin = rope_tables(cfg, positions)
    B, T = positions.shape
    mask = _causal_mask(T)

    def dot(x, w):  # x @ w.T, float32
        return jnp.einsum("btk,nk->btn", x, w.astype(jnp.float32))

    def layer(carry, xs):
        flp, qlp, h, m = xs
        out = {}
        xa = rms_norm(h, flp["attn_norm"], eps)
        ref = {n: dot(xa, flp[n]) for n in ("wq", "wk", "wv")}
        for n, r in ref.items():
            out[n] = _sq(linear(xa, qlp[n]), r)
        q = apply_rope(ref["wq"].reshape(B, T, H, D), cos, sin)
        k = apply_rope(ref["wk"].reshape(B, T, Hkv, D), cos, sin)
        v = ref["wv"].reshape(B, T, Hkv, D)
        if "k_post" in flp:
            q, k = apply_k_post(q, k, flp["k_post"])
        kr = jnp.repeat(k, H // Hkv, axis=2)
        logits = jnp.einsum("bthd,bshd->bhts", q, kr)
        kq = kv_fmt.fake_quant(k) if kv_fmt is not None else k
        qq = fake_quant_per_token(q) if query_fp8 else q
        logits_q = jnp.einsum("bthd,bshd->bhts", qq, jnp.repeat(kq, H // Hkv, axis=2))
        out["keys"] = _sq(jnp.where(mask, logits_q, 0.0), jnp.where(mask, logits, 0.0))
        p = jax.nn.softmax(jnp.where(mask, logits * D ** -0.5, -jnp.inf), axis=-1)
        o = jnp.einsum("bhts,bshd->bthd", p, jnp.repeat(v, H // Hkv, axis=2))
        o = o.reshape(B, T, H * D)
        out["wo"] = _sq(linear(o, qlp["wo"]), dot(o, flp["wo"]))
        xm = rms_norm(m, flp["mlp_norm"], eps)
        g, u = dot(xm, flp["w_gate"]), dot(xm, flp["w_up"])
        out["w_gate"] = _sq(linear(xm, qlp["w_gate"]), g)
        out["w_up"] = _sq(linear(xm, qlp["w_up"]), u)
        hm = jax.nn.silu(g) * u
        out["w_down"] = _sq(linear(hm, qlp["w_down"]), dot(hm, flp["w_down"]))
        return carry, out

    _, out = jax.lax.scan(layer, None, (fp["layers"], qp["layers"], inputs, mids))
    return out


def _stream(cfg: ModelConfig, params: dict, tokens, kv_fmt, query_fp8: bool):
    """(inputs [L, B, T, D], mids [L, B, T, D], outs [L, B, T, D]) of a fresh pass."""
    from fineserve_jax.model.kv import DenseKVCache, DenseKVMeta
    from fineserve_jax.model.transformer import residual_stream

    B, T = tokens.shape
    kv = DenseKVCache(sliding_window=cfg.sliding_window, fmt=kv_fmt)
    state = DenseKVCache.init(cfg.num_layers, B, T, cfg.num_kv_heads, cfg.head_dim,
                              jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    meta = DenseKVMeta(positions, jnp.full((B,), T, jnp.int32))
    x0, mids, outs = residual_stream(cfg, params, tokens, positions, kv, state, meta,
                                     jnp.float32, query_fp8)
    inputs = jnp.concatenate([x0[None], outs[:-1]], axis=0)
    return inputs, mids, outs


def layer_errors(cfg: ModelConfig, params: dict, tokens, steps: dict[str, Precision] | None = None,
                 *, stats=None, tokenizer=None, calib_tokens: int | None = None,
                 progress: bool = True) -> LayerErrors:
    """Per-layer relative errors of each precision in ``steps`` (default
    ``fireq_ablation()``) on ``tokens`` i32[B, T], for the float32 ``params``.

    Key statistics (pre-/post-RoPE steps) come from ``stats`` (``smoothing.key_stats``) or are
    computed from the packaged text with ``tokenizer`` on ``calib_tokens`` tokens (default: the
    recipe's ``calib_tokens``), once for all steps."""
    from tqdm.auto import tqdm

    from fineserve_jax.model.kv_formats import kv_format
    from fineserve_jax.quant.model import calibration_sequences, quantize_linears
    from fineserve_jax.quant.smoothing import key_stats, smooth

    steps = fireq_ablation() if steps is None else steps
    if not steps:
        raise ValueError("no precisions to compare")
    tokens = jnp.asarray(np.asarray(tokens, np.int32))
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be i32[B, T], got shape {tokens.shape}")
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    need = [p.smoothing for p in steps.values()
            if p.smoothing is not None and p.smoothing.needs_calibration]
    n_calib = 0
    if need and stats is None:
        if tokenizer is None:
            raise ValueError("the RoPE steps need key statistics: pass stats= or tokenizer=")
        sm = need[0]
        n = calib_tokens or sm.calib_tokens
        seqs = calibration_sequences(tokenizer, sm.calib_start, n, min(sm.calib_seq_len, n))
        stats = key_stats(cfg, params, seqs, progress=progress)
    if need:
        n_calib = int(stats.tokens)

    stream_fn = jax.jit(lambda p, t, q8, fmt: _stream(cfg, p, t, fmt, q8),
                        static_argnums=(2, 3))
    layer_fn = jax.jit(lambda fp, qp, i, m, pos, fmt, q8: _per_layer(cfg, fp, qp, i, m, pos,
                                                                     fmt, q8),
                       static_argnums=(5, 6))
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    _, _, ref_outs = stream_fn(params, tokens, False, None)

    names = tuple(steps)
    stream = np.zeros((len(names), cfg.num_layers))
    keys = np.zeros_like(stream)
    lin = {n: np.zeros_like(stream) for n in LINEAR_NAMES}
    for i, name in enumerate(tqdm(names, desc="layer errors", disable=not progress,
                                  leave=False)):
        prec = steps[name]
        fp = params if prec.smoothing is None else smooth(cfg, params, prec.smoothing, stats)
        qp = quantize_linears(fp, prec)
        fmt = kv_format(prec.kv_format) if prec.kv_format else None
        inputs, mids, _ = stream_fn(fp, tokens, False, None)
        _, _, q_outs = stream_fn(qp, tokens, bool(prec.query_fp8), fmt)
        err = np.sqrt(np.sum((np.asarray(q_outs, np.float64) - np.asarray(ref_outs)) ** 2,
                             axis=(1, 2, 3)))
        stream[i] = err / np.sqrt(np.sum(np.asarray(ref_outs, np.float64) ** 2, axis=(1, 2, 3)))
        per = layer_fn(fp, qp, inputs, mids, positions, fmt, bool(prec.query_fp8))
        for n in LINEAR_NAMES + ("keys",):
            e, r = (np.asarray(a, np.float64) for a in per[n])
            (keys if n == "keys" else lin[n])[i] = np.sqrt(e / np.where(r > 0, r, 1.0))
    return LayerErrors(names, stream, lin, keys, int(tokens.size), n_calib)
