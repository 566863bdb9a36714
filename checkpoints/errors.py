"""Errors raised while reading or writing checkpoints."""


class CheckpointError(ValueError):
    """A checkpoint is malformed: the message names the tensor or field at fault."""
