"""The Python API for notebooks and tests: ``LLM`` and ``SamplingParams``.

    llm = LLM("smollm2-135m", precision="bf16", dtype="bfloat16")
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=20, temperature=0))
    for delta in llm.stream("Once upon a time", SamplingParams(max_tokens=50)): print(delta, end="")
    llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=30))
    llm.logits(ids)  # float32 [T, vocab]
"""

from __future__ import annotations

import os
import time
from typing import Iterator, Mapping, Sequence

import numpy as np

from fineserve_jax.engine import Engine, EngineConfig
from fineserve_jax.precisions import PRECISIONS as _PRECISIONS
from fineserve_jax.runner import DenseRunner, bucket
from fineserve_jax.sampling import SamplingParams
from fineserve_jax.sequence import RequestOutput

PRECISIONS = tuple(_PRECISIONS)

Prompt = str | Sequence[int]
Message = Mapping[str, str]


class LLM:
    """One model loaded for generation on the default JAX device.

    ``source``: the alias ``smollm2-135m``, a ``.gguf`` file, an HF directory or an Orbax
    checkpoint directory. ``precision``: one of ``precisions.PRECISIONS``; an unquantized
    source is quantized on load (calibration, smoothing, rounding: a minute or two on a CPU;
    ``python -m checkpoints.convert --precision`` does it once), a quantized checkpoint is
    served as stored (None: its own precision, bf16 for other sources). ``dtype``:
    ``"bfloat16"`` or ``"float32"`` compute and storage of everything not quantized.
    Generation runs on an ``Engine`` of its own (continuous batching over a paged KV pool
    of ``kv_budget_bytes``); shapes compile on first use unless ``engine_config`` asks
    for a warm-up. ``llm.engine`` is that engine, for stats or more requests.
    """

    def __init__(self, source: str | os.PathLike, precision: str | None = None,
                 dtype: str = "bfloat16", *, progress: bool = True,
                 kv_budget_bytes: int = 256 * 2**20, engine_config: EngineConfig | None = None):
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not available; choose from {PRECISIONS}")
        from checkpoints import load_in_precision  # converter imports stay out of the package

        t0 = time.perf_counter()
        loaded, prec = load_in_precision(source, precision, dtype, progress=progress)
        params = loaded.params
        self.quantize_report = loaded.metadata.get("quantization")
        precision = prec.name
        self.source = str(source)
        self.precision = precision
        self.dtype = dtype
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.metadata = loaded.metadata
        ec = engine_config or EngineConfig(kv_budget_bytes=kv_budget_bytes, warmup=False,
                                           max_model_len=self.config.max_position_embeddings)
        self.engine = Engine(ec)
        self.name = "model"
        self.engine.add_model(self.name, self.config, params, self.tokenizer, dtype=dtype,
                              precision=prec)
        self.engine.start()
        # Full-sequence scoring (logits, perplexity) needs no KV pool: a dense pass over the
        # very weights the engine runs, its K/V through the same KV format.
        from fineserve_jax.model.kv_formats import kv_format

        info = self.engine.model_info(self.name)
        fmt = kv_format(info["kv_format"])
        self.runner = DenseRunner(self.config, self.engine.weights(self.name), dtype,
                                  kv_format=fmt if prec.kv_format else None,
                                  query_fp8=prec.query_fp8)
        self.load_seconds = time.perf_counter() - t0

    def __repr__(self):
        c = self.config
        return (f"LLM({self.source!r}, precision={self.precision!r}, dtype={self.dtype!r}, "
                f"{c.num_params() / 1e6:.0f}M params, layers={c.num_layers}, "
                f"heads={c.num_heads}/{c.num_kv_heads}, vocab={c.vocab_size})")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(wait=False)

    # ----------------------------------------------------------------- public
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt (a string, or a list of token ids)."""
        prompts = _as_prompt_list(prompts)
        plist = _as_params_list(params, len(prompts))
        handles = [self._submit(p, sp) for p, sp in zip(prompts, plist)]
        try:
            return [h.result() for h in handles]
        finally:
            for h in handles:  # interrupted (e.g. KeyboardInterrupt): free the rest
                h.abort()

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yields text deltas of one prompt as they are generated."""
        for d in self._submit(prompt, params or SamplingParams()):
            if d.finish_reason == "error":
                raise RuntimeError(d.error)
            if d.text:
                yield d.text

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
             params: SamplingParams | None = None) -> RequestOutput | list[RequestOutput]:
        """Applies the chat template; one conversation -> one output, a list -> a list."""
        single = bool(messages) and isinstance(messages[0], Mapping)
        convs = [messages] if single else list(messages)
        ids = [self.tokenizer.encode_chat(c) for c in convs]
        outs = self.generate(ids, params)
        return outs[0] if single else outs

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 [T, vocab] next-token logits for every position of one sequence."""
        ids = self._check_ids(token_ids)
        T = len(ids)
        padded = np.zeros((1, bucket(T)), np.int32)
        padded[0, :T] = ids
        return np.asarray(self.runner.logits(padded))[0, :T]

    # --------------------------------------------------------------- internals
    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("empty prompt")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.config.vocab_size}): {bad[:5]}")
        if len(ids) >= self.config.max_position_embeddings:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the context of "
                             f"{self.config.max_position_embeddings}")
        return ids

    def _submit(self, prompt: Prompt, sp: SamplingParams):
        if not isinstance(prompt, str):
            prompt = self._check_ids(prompt)
        return self.engine.submit(self.name, prompt, sp, sync=True)


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if all(isinstance(p, (int, np.integer)) for p in prompts):
        return [prompts]  # one prompt as token ids
    return prompts


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} SamplingParams for {n} prompts")
    return params
