"""Why an engine refuses a request at ``submit``: the errors and the prompt check.

``RequestRejected`` names the request field at fault (the server turns it into a 400
with an OpenAI-style error body); ``ModelRetiring`` tells a router to send the request
elsewhere. ``check_prompt`` is shared by the engine and the Ray replicas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no JAX import for the errors alone
    from fineserve_jax.sampling import SamplingParams


class RequestRejected(ValueError):
    """``submit`` refused a request; ``param`` names the request field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check_prompt(ids: list[int], params: SamplingParams, vocab_size: int, max_len: int,
                 block_tokens: int | None, max_blocks: int | None) -> None:
    """Raises ``RequestRejected`` for a prompt an engine cannot take: empty, token ids out
    of the vocabulary, no room left in the context, or (with ``block_tokens``) more KV
    blocks for prompt + ``max_tokens`` than one sequence may hold."""
    if not ids:
        raise RequestRejected("the prompt is empty", "prompt")
    if any(not 0 <= i < vocab_size for i in ids):
        raise RequestRejected(f"token ids must be in [0, {vocab_size})", "prompt")
    if len(ids) >= max_len:
        raise RequestRejected(f"prompt has {len(ids)} tokens; the context is {max_len}",
                              "prompt")
    if block_tokens:
        worst = min(len(ids) + params.max_tokens, max_len)
        need = -(-worst // block_tokens)
        if need > max_blocks:
            raise RequestRejected(f"{worst} tokens need {need} KV blocks; the model can hold "
                                  f"at most {max_blocks}", "max_tokens")


class ModelRetiring(RequestRejected):
    """``submit`` to a model this engine is retiring (``retire_model``): it is served
    elsewhere now or going away; route the request again."""
