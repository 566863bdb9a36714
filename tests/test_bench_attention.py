"""``bench kernels --op attention`` in quick mode (tiny shapes, Pallas interpret mode):
the GPU benchmark's plumbing, every kernel row checked before it is timed."""

from __future__ import annotations

import json

import pytest


def test_attention_bench_quick_record(tmp_path):
    from fineserve_jax.bench.__main__ import main

    out = tmp_path / "a.json"
    assert main(["kernels", "--op", "attention", "--quick", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["benchmark"] == "kernels-attention" and "--op attention" in rec["command"]
    dec = {r["impl"]: r for r in rec["decode"]}
    assert set(dec) == {"kernel-bf16", "xla-paged-bf16", "dense-bf16", "kernel-int4"}
    for name in ("kernel-bf16", "kernel-int4"):
        r = dec[name]
        assert r["max_row_rel_err"] < 2e-2 and r["seconds"] > 0
        assert r["speedup_vs_kernel_bf16"] == pytest.approx(
            dec["kernel-bf16"]["seconds"] / r["seconds"])
    # K/V bytes read: int4 KV (values + bf16 scale per token and head) is ~1/4 of bf16.
    assert dec["kernel-int4"]["kv_bytes"] < 0.3 * dec["kernel-bf16"]["kv_bytes"]
    pre = {r["impl"]: r for r in rec["prefill"]}
    assert set(pre) == {"fp8-flash", "xla-bf16"}
    assert pre["fp8-flash"]["max_row_rel_err"] < 1e-2  # against its FP8 oracle
    assert pre["fp8-flash"]["max_row_err_vs_f32"] < 0.25  # FP8 Q, K, V, P vs float32
    assert [g["context"] for g in rec["goals"]["int4_vs_bf16_kv_at_8k_plus"]] == []
    with pytest.raises(SystemExit, match="GPU"):
        main(["kernels", "--op", "attention", "--out", str(out)])
