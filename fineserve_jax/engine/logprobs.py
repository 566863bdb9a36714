"""Log-probabilities of a step's rows, for the requests that asked for them (host side).

``step_logprobs`` runs the runner's small jitted functions only when some row wants
generated-token (``SamplingParams.logprobs``) or prompt-token (``prompt_logprobs``)
log-probabilities; ``record_prompt_logprobs`` keeps each prompt token's entry once, so a
sequence recomputed after preemption does not record its prompt twice.
"""

from __future__ import annotations

import numpy as np

from fineserve_jax.engine.handle import TokenLogprob
from fineserve_jax.engine.runner import LOGPROBS, PagedRunner, StepAux, StepBatch, TopLogprobs
from schedulers.batching import Seq


def step_logprobs(runner: PagedRunner, rows: list[tuple[Seq, int]], batch: StepBatch,
                  nxt: np.ndarray, aux: StepAux
                  ) -> tuple[TopLogprobs | None, TopLogprobs | None]:
    """(generated-token, prompt-token) log-probabilities as numpy for the step's rows;
    None where no row asked."""
    gen = prompt = None
    if any(s.state.params.logprobs is not None for s, _ in rows):
        gen = TopLogprobs(*map(np.asarray, LOGPROBS.fn(aux.logits, nxt)))
    targets = np.zeros(batch.tokens.shape, np.int32)
    want = False
    for i, (seq, c) in enumerate(rows):
        if seq.state.params.prompt_logprobs is None:
            continue
        n_prompt, a = len(seq.state.prompt_ids), seq.num_computed
        end = min(a + c, n_prompt - 1)  # fed positions [a, end) predict prompt tokens
        if max(a, len(seq.prompt_lps)) >= end:
            continue  # all recorded (a recompute after preemption), or none fed
        targets[i, :end - a] = seq.tokens[a + 1:end + 1]
        want = True
    if want:
        prompt = TopLogprobs(*map(np.asarray, runner.prompt_logprobs(aux, targets)))
    return gen, prompt


def token_logprob(t: TopLogprobs, idx, token: int, k: int) -> TokenLogprob:
    """Entry ``idx`` of ``t`` for ``token``, with its ``k`` best alternatives."""
    return TokenLogprob(int(token), float(t.logprob[idx]), int(t.rank[idx]),
                        [(int(a), float(b)) for a, b in
                         zip(t.top_ids[idx][:k], t.top_logprobs[idx][:k])])


def record_prompt_logprobs(seq: Seq, fed: int, row: int, t: TopLogprobs) -> None:
    """Append the prompt tokens predicted by this step's ``fed`` tokens of ``seq``."""
    n_prompt, a = len(seq.state.prompt_ids), seq.num_computed
    k = seq.state.params.prompt_logprobs
    for pos in range(a, min(a + fed, n_prompt - 1)):  # fed position -> token pos + 1
        if pos == len(seq.prompt_lps):
            seq.prompt_lps.append(token_logprob(t, (row, pos - a), seq.tokens[pos + 1], k))
