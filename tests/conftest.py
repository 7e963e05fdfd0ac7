"""Shared fixtures: the real SmolLM2-135M and tiny random models of each architecture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The
# flag is read when a kernel is decorated, so it must be set before any import.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct, converted to safetensors once per machine."""
    from extractor.models.smollm2 import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_path):
    import torch
    from transformers import AutoTokenizer

    from extractor.models import load_causal_lm

    model = load_causal_lm(smollm2_path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(smollm2_path)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 endpoint on loopback (moto's server), for the whole session."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    # This interpreter's moto, not whatever moto_server is first on PATH.
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(os.environ.get("SLM_LENS_MOTO_LOG", os.devnull), "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch):
    """Environment pointing slm-lens at the loopback S3, and a fresh bucket name."""
    import uuid

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    bucket = f"slm-{uuid.uuid4().hex[:10]}"
    from analysis.storage import s3_filesystem

    s3_filesystem(allow_bucket_creation=True).create_dir(bucket)
    return bucket
