"""The quantized-checkpoint cache: processes that need one entry at once."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from tiny_models import make_hf_model


def _convert(src: str, cache: str, out):
    import logging

    logging.basicConfig(level=logging.INFO)
    from checkpoints.cache import cached_checkpoint
    from fineserve_jax.precisions import get_precision

    path, made = cached_checkpoint(src, get_precision("w4a16"), "float32", cache_dir=cache,
                                   progress=False)
    out.put((str(path), made))


def test_two_processes_asking_at_once_convert_once(tmp_path):
    src = tmp_path / "tiny"
    make_hf_model(src, seed=3)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_convert, args=(str(src), str(tmp_path / "cache"), q))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    from checkpoints.cache import checkpoint_path
    from fineserve_jax.precisions import get_precision

    assert got[0][0] == got[1][0] == str(checkpoint_path(
        str(src), get_precision("w4a16"), "float32", tmp_path / "cache"))  # one entry
    assert sorted(m for _, m in got) == [False, True]  # converted once, loaded once
    entries = [p.name for p in (tmp_path / "cache" / "checkpoints").iterdir()
               if not p.name.startswith(".")]
    assert entries == [Path(got[0][0]).name]
    assert not list((tmp_path / "cache" / "checkpoints").glob(".*.tmp-*"))
