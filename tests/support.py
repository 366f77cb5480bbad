"""Helpers shared by the server and router tests: waiting on a condition, reading a
Prometheus counter; for the vLLM tests, a tiny Llama's config.json and a server subprocess
(a free port, waiting for its /health, stopping it)."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

# A tiny Llama's Hugging Face config.json: 2 layers, hidden 128, a 512-token vocabulary.
TINY_LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
    "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
    "num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}


def wait_for(pred, what: str, timeout: float = 60.0) -> None:
    """Until ``pred()`` holds (the timeout only turns a hang into a failure)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in a /metrics text whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, base: str, log: Path, timeout: float, what: str = "server") -> None:
    """Until ``base``/health answers; fails the test (with the tail of ``log``) if ``proc``
    exits first or ``timeout`` seconds pass (a hang becomes a failure, not a wait forever)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not up in {timeout:g} s:\n{log.read_text()[-4000:]}")
        time.sleep(1)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
