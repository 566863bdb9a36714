"""``python serve.py`` as a user runs it: starts, answers, shuts down."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_py_default_model_answers():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
            ids = [m["id"] for m in json.load(r)["data"]]
        assert ids == ["smollm2-135m-bf16"]
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", method="POST",
            headers={"content-type": "application/json"},
            data=json.dumps({"model": ids[0], "prompt": "The capital of France is",
                             "max_tokens": 2, "temperature": 0}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            assert "Paris" in json.load(r)["choices"][0]["text"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
