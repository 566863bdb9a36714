"""Resolve a model source (alias, ``.gguf``, HF directory, Orbax directory) and load it.

``load_model(src, dtype)`` is what the notebook API and the converter share: it returns
the config, the params tree (numpy), the tokenizer and the metadata that a checkpoint
records about where the weights came from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from checkpoints import orbax_io
from checkpoints.assemble import assemble
from checkpoints.errors import CheckpointError
from checkpoints.gguf_source import GGUFSource
from checkpoints.kernel_layout import LAYOUT_KEY, for_backend, from_kernel, to_kernel
from checkpoints.hf_source import HFSource
from fineserve_jax.assets import SMOLLM2_ALIAS, smollm2_gguf_path
from fineserve_jax.config import ModelConfig
from fineserve_jax.tokenizer import Tokenizer

DTYPES = ("float32", "bfloat16")
ALIASES = {SMOLLM2_ALIAS: smollm2_gguf_path}


@dataclass
class LoadedModel:
    config: ModelConfig
    params: Any  # numpy arrays, params tree of fineserve_jax.model.params
    tokenizer: Tokenizer
    metadata: dict  # what a checkpoint records (see orbax_io)

    def __repr__(self):
        m = self.metadata
        return (f"LoadedModel({m.get('source')!r}, precision={m.get('precision')}, "
                f"dtype={m.get('dtype')}, layers={self.config.num_layers}, "
                f"hidden={self.config.hidden_size})")


def source_kind(src: str | Path) -> str:
    s = str(src)
    if s in ALIASES:
        return "alias"
    p = Path(s)
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if p.is_dir() and orbax_io.is_orbax_checkpoint(p):
        return "orbax"
    if p.is_dir() and (p / "config.json").exists():
        return "hf"
    if not p.exists():
        raise FileNotFoundError(f"model source {s!r} not found (give an alias "
                                f"{sorted(ALIASES)}, a .gguf file, an HF or Orbax directory)")
    raise CheckpointError(f"cannot tell what {s!r} is: expected a .gguf file, an HF directory "
                          f"with config.json, or an Orbax checkpoint directory")


def sha256_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def load_model(src: str | Path, dtype: str = "bfloat16", *, progress: bool = True) -> LoadedModel:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    kind = source_kind(src)
    if kind == "orbax":
        params, meta, tok_json = orbax_io.load(src)
        params = for_backend(params, meta)  # the kernel layout stays on a GPU only
        if meta["dtype"] != dtype:  # e.g. a float32 checkpoint served in bfloat16
            want = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
            if meta.get("precision_recipe") is not None:  # quantized weights stay as stored
                from fineserve_jax.quant.model import cast_unquantized

                params = cast_unquantized(params, want)
            else:
                params = jax.tree.map(lambda a: np.asarray(a).astype(want), params)
            meta = dict(meta, dtype=dtype)
        tok = Tokenizer.from_json(tok_json, meta["tokenizer"])
        return LoadedModel(ModelConfig.from_dict(meta["config"]), params, tok, meta)
    path = ALIASES[str(src)]() if kind == "alias" else Path(src)
    if kind in ("alias", "gguf"):
        source, fmt, hashed = GGUFSource(path), "gguf", [path]
        n = len(source.tensors)
    else:
        source, fmt = HFSource(path), "hf"
        hashed = source.hashed_files()
        n = sum(len(f.names) for f in source.files)
    tok = source.tokenizer()
    cfg = source.config
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"tokenizer has {tok.vocab_size} tokens but the model's "
                              f"vocab_size is {cfg.vocab_size}")
    params = assemble(cfg, source.iter_tensors(), fmt, dtype, total=n, progress=progress)
    meta = {
        "config": cfg.to_dict(),
        "precision": "bf16",  # unquantized weights (stored in `dtype`)
        "dtype": dtype,
        "tokenizer": tok.meta(),
        "source": str(src),
        "source_format": fmt,
        "source_sha256": sha256_files(hashed),
    }
    return LoadedModel(cfg, params, tok, meta)


def quantize_loaded(model: LoadedModel, precision, dtype: str, *,
                    progress: bool = True) -> LoadedModel:
    """``model`` (loaded in float32) in ``precision``: calibrated, smoothed and rounded by
    ``fineserve_jax.quant.quantize_model``; unquantized leaves in ``dtype``."""
    from fineserve_jax.precisions import get_precision
    from fineserve_jax.quant.model import quantize_model

    prec = get_precision(precision)
    if model.metadata.get("precision_recipe") is not None:
        raise CheckpointError(f"the model is already quantized "
                              f"({model.metadata['precision']}); quantize from its source")
    if model.metadata.get("dtype") != "float32":
        raise ValueError("quantize from float32 weights (load_model(src, 'float32'))")
    params, report = quantize_model(model.config, model.params, prec, model.tokenizer,
                                    dtype=dtype, progress=progress)
    meta = dict(model.metadata, precision=prec.name, dtype=dtype)
    if prec.quantized or prec.smoothing is not None:
        meta.update(precision_recipe=prec.to_dict(), quantization=report)
    return LoadedModel(model.config, params, model.tokenizer, meta)


def load_in_precision(src: str | Path, precision=None, dtype: str = "bfloat16", *,
                      progress: bool = True):
    """(model with params in ``precision``, that ``Precision``), for serving.

    A quantized Orbax checkpoint is served as stored (``precision`` None or its own name;
    anything else is refused: convert the source again). Any other source is loaded and,
    for a quantized precision, quantized now (float32 in, ``dtype`` for the rest).
    """
    from fineserve_jax.precisions import Precision, get_precision

    stored = None
    if source_kind(src) == "orbax":
        meta = orbax_io.read_metadata(src)
        if meta.get("precision_recipe") is not None:
            stored = Precision.from_dict(meta["precision_recipe"])
    if stored is not None:
        if precision not in (None, stored.name):
            raise ValueError(f"{src} holds {stored.name!r} weights; convert the source "
                             f"again for {precision!r}")
        return load_model(src, dtype, progress=progress), stored
    prec = get_precision(precision or "bf16")
    if prec.quantized or prec.smoothing is not None:
        return (quantize_loaded(load_model(src, "float32", progress=progress), prec, dtype,
                                progress=progress), prec)
    return load_model(src, dtype, progress=progress), prec


def save_model(model: LoadedModel, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` as an Orbax checkpoint. INT4 x FP8 weights are stored in the GPU
    kernel's layout, named in the metadata (``checkpoints.kernel_layout``)."""
    params, meta = model.params, dict(model.metadata)
    meta.pop(LAYOUT_KEY, None)
    if meta.get("precision_recipe") is not None:
        from pallas_kernels.w4a8 import W4A8Weight

        if any(isinstance(w, W4A8Weight) for w in params["layers"].values()):
            params = from_kernel(params)  # loaded on a GPU: store from the one form
        params, layout = to_kernel(params)
        if layout is not None:
            meta[LAYOUT_KEY] = layout
    return orbax_io.save(out, params, meta, model.tokenizer.to_json(), overwrite=overwrite)
