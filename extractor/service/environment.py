"""Which environment variables a run shares with its Ray processes, and which it never does.

Ray serves every job's and actor's ``runtime_env`` in plain text (dashboard API,
``ray list actors --detail``), so credentials never travel there: each node takes
them from its own environment (Kubernetes secrets through ``envFrom``, instance
roles, a credentials file). Only the settings below are forwarded, by the driver
to its actors and by the watcher to the jobs it submits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: Non-secret settings that every process of a run must agree on.
FORWARDED = (
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "SLM_LENS_S3_ENDPOINT",
    "SLM_LENS_S3_RETRIES",
    "SLM_LENS_IO_ATTEMPTS",
    "SLM_LENS_CACHE",
    "SLM_LENS_COMPILE",
    "HF_HUB_OFFLINE",
    "HF_ENDPOINT",
)
#: Never forwarded, whatever a caller asks.
SECRETS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)


def forwarded_env(
    environ: Mapping[str, str] | None = None, extra: tuple[str, ...] = ()
) -> dict[str, str]:
    """The forwarded settings present in ``environ`` (default: this process), plus ``extra``."""
    environ = os.environ if environ is None else environ
    names = [n for n in (*FORWARDED, *extra) if n not in SECRETS]
    return {n: environ[n] for n in names if n in environ}
