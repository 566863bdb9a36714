"""The OpenAI-compatible HTTP front end (Starlette)."""

from fineserve_jax.server.app import build_app

__all__ = ["build_app"]
