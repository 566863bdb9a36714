"""Strict conversion: bad checkpoints fail with a message naming the tensor at fault."""

from __future__ import annotations

import json
import struct

import jax
import ml_dtypes
import numpy as np
import pytest

from checkpoints import CheckpointError, load_model, save_model
from checkpoints import orbax_io
from fineserve_jax.config import UnsupportedModelError
from tiny_models import make_hf_model


def _rewrite_safetensors(path, edit):
    """Rewrite a safetensors file after ``edit(header, tensors)`` (dicts of numpy arrays)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    data = raw[8 + n:]
    tensors = {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
               for k, v in header.items()}
    edit(tensors)
    new_header, blobs, off = {}, [], 0
    for k, (dt, shape, blob) in tensors.items():
        new_header[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    if meta:
        new_header["__metadata__"] = meta
    hb = json.dumps(new_header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))


@pytest.fixture
def hf_dir(tmp_path):
    make_hf_model(tmp_path / "hf", num_key_value_heads=2)
    return tmp_path / "hf"


def test_truncated_safetensors_names_tensor(hf_dir):
    f = hf_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"truncated: tensor '[\w.]+'"):
        load_model(hf_dir, "float32", progress=False)


def test_wrong_shape_names_tensor(hf_dir):
    def edit(t):
        dt, shape, blob = t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.1.mlp.up_proj.weight"] = (dt, [shape[0] // 2, shape[1]], blob[:len(blob) // 2])

    _rewrite_safetensors(hf_dir / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape"):
        load_model(hf_dir, "float32", progress=False)


def test_unknown_and_missing_tensors_are_named(hf_dir):
    f = hf_dir / "model.safetensors"
    orig = f.read_bytes()
    _rewrite_safetensors(f, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight",
                                                    ("F32", [2], b"\0" * 8)))
    with pytest.raises(CheckpointError, match=r"unknown tensor 'model\.layers\.0\.self_attn\.extra\.weight'"):
        load_model(hf_dir, "float32", progress=False)
    f.write_bytes(orig)
    _rewrite_safetensors(f, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(hf_dir, "float32", progress=False)


def test_duplicate_tensor_across_shards(hf_dir):
    f = hf_dir / "model.safetensors"
    extra = hf_dir / "model-extra.safetensors"
    extra.write_bytes(f.read_bytes())
    _rewrite_safetensors(extra, lambda t: [t.pop(k) for k in list(t) if k != "model.norm.weight"])
    with pytest.raises(CheckpointError, match=r"duplicate tensor 'model\.norm\.weight'"):
        load_model(hf_dir, "float32", progress=False)


def test_unsupported_architecture_is_rejected(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture.*gpt_neox"):
        load_model(hf_dir, "float32", progress=False)


def test_unsupported_rope_scaling_is_rejected(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="rope_scaling type 'yarn'"):
        load_model(hf_dir, "float32", progress=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip_is_exact(hf_dir, tmp_path, dtype):
    m = load_model(hf_dir, dtype, progress=False)
    save_model(m, tmp_path / "ck")
    params, meta, tok_json = orbax_io.load(tmp_path / "ck")
    want = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    flat_a = jax.tree_util.tree_leaves_with_path(m.params)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(params))
    assert len(flat_a) == len(flat_b)
    for path, a in flat_a:
        b = np.asarray(flat_b[path])
        assert b.dtype == want and b.shape == a.shape
        assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)
    assert meta["config"] == m.metadata["config"] and meta["source_sha256"] == m.metadata["source_sha256"]
    assert tok_json == m.tokenizer.to_json()


def test_orbax_with_wrong_shape_names_array(hf_dir, tmp_path):
    m = load_model(hf_dir, "float32", progress=False)
    m.params["layers"]["wo"] = m.params["layers"]["wo"][:, :, :8]
    save_model(m, tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"array layers\.wo .*shape \(2, 64, 8\)"):
        orbax_io.load(tmp_path / "ck")


def test_orbax_checkpoint_loads_in_another_dtype(hf_dir, tmp_path):
    save_model(load_model(hf_dir, "float32", progress=False), tmp_path / "ck")
    m = load_model(tmp_path / "ck", "bfloat16", progress=False)
    assert m.metadata["dtype"] == "bfloat16"
    leaves = jax.tree.leaves(m.params)
    assert leaves and all(np.asarray(a).dtype == np.dtype(ml_dtypes.bfloat16) for a in leaves)
