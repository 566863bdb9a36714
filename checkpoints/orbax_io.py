"""Orbax checkpoints of converted models.

Layout of a checkpoint directory::

    DIR/params/          Orbax StandardSave of the params tree
    DIR/metadata/        Orbax JsonSave: format version, model config, precision, dtype,
                         tokenizer ids, chat template, source and its sha256; a quantized
                         checkpoint adds ``precision_recipe`` (every hyperparameter of
                         ``precisions.Precision``) and ``quantization`` (calibration figures)
    DIR/tokenizer.json   the tokenizer, readable by HF ``tokenizers``

Restore checks the stored tree against the params spec of the stored config first, so a
wrong shape or a missing array is reported by name before any bytes are read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from checkpoints.errors import CheckpointError
from checkpoints.kernel_layout import LAYOUT_KEY, abstract_kernel, check_layout
from fineserve_jax.config import ModelConfig
from fineserve_jax.model.params import abstract_params

FORMAT_VERSION = 1
_TOKENIZER_FILE = "tokenizer.json"


def is_orbax_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "metadata").is_dir() and (p / "params").is_dir()


def save(directory: str | Path, params: Any, metadata: dict, tokenizer_json: str,
         *, overwrite: bool = False) -> Path:
    directory = Path(directory).absolute()
    if directory.exists():
        if not overwrite:
            raise FileExistsError(f"{directory} exists (pass overwrite=True / --force)")
        shutil.rmtree(directory)
    metadata = dict(metadata, format_version=FORMAT_VERSION)
    json.dumps(metadata)  # fail before writing anything if it is not JSON
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        ck.save(directory, ocp.args.Composite(params=ocp.args.StandardSave(params),
                                              metadata=ocp.args.JsonSave(metadata)))
    (directory / _TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    return directory


def read_metadata(directory: str | Path) -> dict:
    directory = Path(directory).absolute()
    if not is_orbax_checkpoint(directory):
        raise CheckpointError(f"{directory} is not a fineserve-jax Orbax checkpoint "
                              f"(expected params/ and metadata/)")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        meta = ck.restore(directory, ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: checkpoint format {meta.get('format_version')} "
                              f"is not {FORMAT_VERSION}")
    return meta


def _path_name(path) -> str:
    """``layers.wq.packed``: dict keys and dataclass fields alike (the stored metadata tree
    has dicts where the target has the quantized weight types)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def _check_stored_tree(directory: Path, target: Any) -> None:
    stored = ocp.StandardCheckpointHandler().metadata(directory / "params")
    stored = getattr(stored, "tree", stored)
    flat_stored = {_path_name(k): v for k, v in
                   jax.tree_util.tree_flatten_with_path(stored)[0]}
    flat_target = {_path_name(k): v for k, v in
                   jax.tree_util.tree_flatten_with_path(target)[0]}
    for name, want in flat_target.items():
        have = flat_stored.get(name)
        if have is None:
            raise CheckpointError(f"checkpoint {directory} is missing array {name}")
        if tuple(have.shape) != tuple(want.shape):
            raise CheckpointError(f"array {name} in {directory} has shape {tuple(have.shape)}, "
                                  f"the config needs {tuple(want.shape)}")
        if np.dtype(have.dtype) != np.dtype(want.dtype):
            raise CheckpointError(f"array {name} in {directory} has dtype {have.dtype}, "
                                  f"the metadata says {want.dtype}")
    extra = sorted(set(flat_stored) - set(flat_target))
    if extra:
        raise CheckpointError(f"checkpoint {directory} has unexpected arrays: {extra[:5]}")


def load(directory: str | Path, target: Any = None) -> tuple[Any, dict, str]:
    """-> (params as numpy arrays, metadata, tokenizer json)."""
    directory = Path(directory).absolute()
    meta = read_metadata(directory)
    if target is None:
        cfg = ModelConfig.from_dict(meta["config"])
        recipe = meta.get("precision_recipe")
        if recipe is not None:  # quantized: the tree the quantizer makes
            from fineserve_jax.precisions import Precision
            from fineserve_jax.quant.model import abstract_quantized

            try:
                prec = Precision.from_dict(recipe)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{directory}: unreadable precision recipe: {e}") from e
            target = abstract_quantized(cfg, prec, meta["dtype"])
            if meta.get(LAYOUT_KEY) is not None:  # stored as the GPU kernel reads it
                target = abstract_kernel(target, check_layout(meta[LAYOUT_KEY], str(directory)))
        else:
            target = abstract_params(cfg, meta["dtype"])
    _check_stored_tree(directory, target)
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
            params = ck.restore(directory, ocp.args.Composite(
                params=ocp.args.StandardRestore(target)))["params"]
    except Exception as e:
        raise CheckpointError(f"cannot restore params from {directory}: {e}") from e
    tok = directory / _TOKENIZER_FILE
    if not tok.exists():
        raise CheckpointError(f"{directory} has no {_TOKENIZER_FILE}")
    return params, meta, tok.read_text(encoding="utf-8")
