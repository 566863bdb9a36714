"""fineserve-jax: multi-model, mixed-precision LLM serving on JAX/Pallas."""

from fineserve_jax.config import ModelConfig
from fineserve_jax.llm import LLM
from fineserve_jax.sampling import SamplingParams
from fineserve_jax.sequence import RequestOutput

__version__ = "0.1.0"
__all__ = ["LLM", "ModelConfig", "RequestOutput", "SamplingParams", "__version__"]
