"""Pallas kernels, one per file, each with a plain-jnp reference beside it."""
