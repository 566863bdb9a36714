"""Quantized checkpoints made once and kept: the server's first start converts, later
starts load.

A cache entry is an ordinary Orbax checkpoint (``checkpoints.convert`` writes the same)
under ``<cache>/checkpoints/<source>-<precision>-<key>``, where the key hashes the
source's identity (resolved path, size, modification time), the whole precision recipe
and the dtype: changing any of them makes a new entry instead of serving a stale one. An
entry is written to a temporary directory and renamed into place, so an interrupted
conversion never leaves a half-written checkpoint behind, and processes that need the
same entry at once (two servers, Ray workers of one node) take turns on a lock file: the
first converts, the others load what it wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from checkpoints import orbax_io
from checkpoints.sources import (
    ALIASES,
    load_model,
    quantize_loaded,
    save_model,
    source_kind,
)

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``~/.cache/fineserve-jax``."""
    return Path.home() / ".cache" / "fineserve-jax"


@contextlib.contextmanager
def _exclusive(lock: Path):
    """Holds an advisory lock on ``lock`` (created if missing) for the block."""
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def with_calibration(precision, tokens: int | None):
    """``precision`` calibrated on ``tokens`` tokens instead of its recipe's (None: as is)."""
    if tokens is None or precision.smoothing is None:
        return precision
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"calibration tokens must be a positive int, got {tokens!r}")
    s = precision.smoothing
    return precision.replace(smoothing=dataclasses.replace(
        s, calib_tokens=tokens, calib_seq_len=min(s.calib_seq_len, tokens)))


def _identity(src: str) -> list:
    path = Path(ALIASES[src]()) if source_kind(src) == "alias" else Path(src)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [str(path.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns]
                                    for p in files]


def checkpoint_path(src: str, precision, dtype: str = "bfloat16",
                    cache_dir: str | Path | None = None) -> Path:
    """Where ``cached_checkpoint`` keeps ``src`` in ``precision`` (made or not)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(json.dumps([_identity(str(src)), precision.to_dict(), dtype],
                                    sort_keys=True).encode()).hexdigest()[:12]
    stem = Path(str(src)).name.removesuffix(".gguf") or "model"
    return root / "checkpoints" / f"{stem}-{precision.name}-{key}"


def cached_checkpoint(src: str, precision, dtype: str = "bfloat16", *,
                      cache_dir: str | Path | None = None, progress: bool = True
                      ) -> tuple[Path, bool]:
    """(path of an Orbax checkpoint of ``src`` quantized to ``precision``, made now?).

    ``precision`` is a ``Precision`` (``with_calibration`` to change its calibration)."""
    out = checkpoint_path(src, precision, dtype, cache_dir)
    if out.is_dir() and orbax_io.is_orbax_checkpoint(out):
        return out, False
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out.with_name(f".{out.name}.lock")):
        if out.is_dir() and orbax_io.is_orbax_checkpoint(out):  # another process made it
            return out, False
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("quantizing %s to %s (once; cached as %s)", src, precision.name, out)
        model = quantize_loaded(load_model(src, "float32", progress=progress), precision,
                                dtype, progress=progress)
        try:
            save_model(model, tmp)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out, True


def load_served(spec: dict, cache_dir: str | Path | None = None, progress: bool = True):
    """(LoadedModel, Precision) of one served model ``spec`` (``serve.py``'s model keys:
    name, source, precision, dtype, calib_tokens); a quantized one through the checkpoint
    cache. Raises ValueError naming the model when it cannot be loaded."""
    import time

    from checkpoints import load_in_precision, source_kind
    from fineserve_jax.precisions import PRECISIONS

    t0 = time.perf_counter()
    name, src, prec_name = spec["name"], spec["source"], spec.get("precision")
    if prec_name is not None and prec_name not in PRECISIONS:
        raise ValueError(f"model {name}: precision {prec_name!r} is not available; choose "
                         f"from {sorted(PRECISIONS)}")
    dtype = spec.get("dtype") or "bfloat16"
    try:
        prec = PRECISIONS.get(prec_name or "bf16")
        if source_kind(src) != "orbax" and (prec.quantized or prec.smoothing is not None):
            prec = with_calibration(prec, spec.get("calib_tokens"))
            path, made = cached_checkpoint(src, prec, dtype, cache_dir=cache_dir,
                                           progress=progress)
            log.info("model %s: %s checkpoint %s %s", name, prec.name, path,
                     "written" if made else "from the cache")
            src = str(path)
        loaded, prec = load_in_precision(src, prec_name, dtype, progress=progress)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model {name} from {spec['source']}: {e}") from None
    log.info("model %s: %s, precision %s, dtype %s, loaded in %.1fs", name, spec["source"],
             prec.name, dtype, time.perf_counter() - t0)
    return loaded, prec
