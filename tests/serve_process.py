"""Shared by the tests that start ``python serve.py`` as a subprocess."""

from __future__ import annotations

import time

import httpx
import pytest


def wait_healthy(url: str, proc, log, timeout_s: float) -> None:
    """Returns once ``url``/health answers 200; fails with the end of ``log`` (the
    process's output file) if ``proc`` exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"serve.py exited with {proc.returncode}:\n{log.read()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            log.seek(0)
            pytest.fail(f"serve.py did not answer /health in {timeout_s:g} s:\n"
                        f"{log.read()[-4000:]}")
        time.sleep(0.5)
