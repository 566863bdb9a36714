"""Which model on a device steps next: the pluggable choice the engine loop asks for.

Plain Python. The engine hands the policy one ``ModelLoad`` per model that has work and
steps the model it names. ``RoundRobin`` is the simple fair policy; the SLO-aware
choice (deadline urgency, decode TPOT protection) implements the same ``choose``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class ModelLoad:
    """What a policy may look at for one model, as of this engine iteration."""

    name: str
    waiting: int  # requests not yet admitted (including preempted ones)
    running: int  # admitted sequences (prefilling or decoding)
    prefilling: int  # admitted sequences whose prompt is not fully in KV yet
    oldest_wait_s: float  # seconds the oldest waiting request has waited; 0 if none
    last_step: int  # engine iteration at which this model last stepped; -1 if never


class ModelChoicePolicy(Protocol):
    def choose(self, candidates: Sequence[ModelLoad]) -> str: ...


class RoundRobin:
    """Fair: the model that stepped least recently goes next (ties by name order)."""

    def choose(self, candidates: Sequence[ModelLoad]) -> str:
        if not candidates:
            raise ValueError("no candidate models")
        return min(candidates, key=lambda m: (m.last_step, m.name)).name

    def __repr__(self):
        return "RoundRobin()"
