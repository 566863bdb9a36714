"""Checkpoint conversion: GGUF and HF safetensors to Orbax, strict about every tensor."""

from checkpoints.errors import CheckpointError
from checkpoints.sources import (LoadedModel, load_in_precision, load_model, quantize_loaded,
                                 save_model, source_kind)

__all__ = ["CheckpointError", "LoadedModel", "load_in_precision", "load_model", "quantize_loaded",
           "save_model", "source_kind"]
