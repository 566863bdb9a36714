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

import jax
import numpy as np

from fineserve_jax.runner import DenseRunner, bucket
from fineserve_jax.sampling import SamplingArrays, SamplingParams, batch_mode
from fineserve_jax.sequence import RequestOutput, SequenceState

PRECISIONS = ("bf16",)  # unquantized weights; quantized tenants register here

Prompt = str | Sequence[int]
Message = Mapping[str, str]


class LLM:
    """One model loaded for generation on the default JAX device.

    ``source``: the alias ``smollm2-135m``, a ``.gguf`` file, an HF directory or an Orbax
    checkpoint directory. ``dtype``: ``"bfloat16"`` or ``"float32"`` compute and storage.
    """

    def __init__(self, source: str | os.PathLike, precision: str = "bf16",
                 dtype: str = "bfloat16", *, progress: bool = True):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not available; choose from {PRECISIONS}")
        from checkpoints import load_model  # converter imports stay out of `import fineserve_jax`

        t0 = time.perf_counter()
        loaded = load_model(source, dtype, progress=progress)
        self.source = str(source)
        self.precision = precision
        self.dtype = dtype
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.metadata = loaded.metadata
        self.runner = DenseRunner(self.config, jax.device_put(loaded.params), dtype)
        self.load_seconds = time.perf_counter() - t0
        self._rng = np.random.default_rng()

    def __repr__(self):
        c = self.config
        return (f"LLM({self.source!r}, precision={self.precision!r}, dtype={self.dtype!r}, "
                f"{c.num_params() / 1e6:.0f}M params, layers={c.num_layers}, "
                f"heads={c.num_heads}/{c.num_kv_heads}, vocab={c.vocab_size})")

    # ----------------------------------------------------------------- public
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt (a string, or a list of token ids)."""
        prompts = _as_prompt_list(prompts)
        plist = _as_params_list(params, len(prompts))
        seqs = [self._new_sequence(p, sp) for p, sp in zip(prompts, plist)]
        for _ in self._run(seqs):
            pass
        return [s.output() for s in seqs]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yields text deltas of one prompt as they are generated."""
        seq = self._new_sequence(prompt, params or SamplingParams())
        for deltas in self._run([seq]):
            if deltas[0]:
                yield deltas[0]

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

    def _new_sequence(self, prompt: Prompt, sp: SamplingParams) -> SequenceState:
        if isinstance(prompt, str):
            ids = self._check_ids(self.tokenizer.encode(prompt))
            text = prompt
        else:
            ids, text = self._check_ids(prompt), None
        return SequenceState(self.tokenizer, sp, ids, text,
                             max_total_len=self.config.max_position_embeddings)

    def _run(self, seqs: list[SequenceState]) -> Iterator[list[str]]:
        """Static-batch generation over a dense cache; yields each step's text deltas."""
        B = bucket(len(seqs), 1)
        lens = np.array([len(s.prompt_ids) for s in seqs], np.int32)
        max_new = max(s.params.max_tokens for s in seqs)
        T = bucket(int(lens.max()))
        S = min(bucket(int(lens.max()) + max_new, 64),
                bucket(self.config.max_position_embeddings, 64))
        tokens = np.zeros((B, T), np.int32)
        positions = np.full((B, T), -1, np.int32)
        for i, s in enumerate(seqs):
            tokens[i, :lens[i]] = s.prompt_ids
            positions[i, :lens[i]] = np.arange(lens[i])
        seq_lens = np.zeros(B, np.int32)
        seq_lens[:len(seqs)] = lens
        logits_idx = np.maximum(seq_lens - 1, 0)
        seeds = [s.params.seed if s.params.seed is not None else int(self._rng.integers(2**31))
                 for s in seqs]
        mode = batch_mode([s.params for s in seqs])
        kv = self.runner.new_cache(B, S)
        step = 0
        while True:
            samp = SamplingArrays.build([s.params for s in seqs], seeds, [step] * len(seqs), B)
            nxt, kv = self.runner.step(kv, tokens, positions, seq_lens, logits_idx, samp, mode)
            nxt = np.asarray(nxt)
            deltas = []
            for i, s in enumerate(seqs):
                deltas.append("" if s.finished else s.append(int(nxt[i])))
            yield deltas
            step += 1
            active = np.array([not s.finished for s in seqs] + [False] * (B - len(seqs)))
            if not active.any() or int(seq_lens.max()) >= S:
                break
            tokens = nxt[:, None].astype(np.int32)
            positions = np.where(active, seq_lens, -1)[:, None].astype(np.int32)
            seq_lens = np.where(active, seq_lens + 1, seq_lens).astype(np.int32)
            logits_idx = np.zeros(B, np.int32)
        for s in seqs:  # cache full before max_tokens: stop by length
            if not s.finished:
                s.finish_reason = "length"


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
