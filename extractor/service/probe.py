"""Is a local store the same folder on every node? Ask each actor to read the driver's probe.

On a multi-node cluster a local path names a different disk on every machine:
each actor would commit its shards where no reader looks, without a word. The
driver writes a probe file with a random token into the store; every actor,
when it starts (also after a restart on a new node), must read that token back
or refuse to work with a message naming its node. Object stores need no probe.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

from analysis import schema
from analysis.storage import resolve


class StoreNotSharedError(RuntimeError):
    """A local store path that this node does not share with the driver."""


@dataclass(frozen=True)
class StoreProbe:
    path: str
    token: str


def write_probe(store_uri: str, run_id: str) -> StoreProbe | None:
    """Write the probe of a local store (None for object stores, which every node shares)."""
    fs, root = resolve(store_uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        return None
    folder = os.path.join(root, schema.PROBE_DIR, f"run_id={run_id}")
    os.makedirs(folder, exist_ok=True)
    probe = StoreProbe(os.path.join(folder, f"{uuid.uuid4().hex}.token"), uuid.uuid4().hex)
    with open(probe.path, "w") as f:
        f.write(probe.token)
    return probe


def check_probe(probe: StoreProbe | None) -> None:
    """Raise :class:`StoreNotSharedError` unless this node reads the driver's token."""
    if probe is None:
        return
    try:
        with open(probe.path) as f:
            seen = f.read()
    except OSError:
        seen = None
    if seen != probe.token:
        store = probe.path.split(f"/{schema.PROBE_DIR}/")[0]
        raise StoreNotSharedError(
            f"the store {store} is a local path, and node {socket.gethostname()} does not "
            f"share it with the driver (cannot read its probe file {probe.path}): on a "
            "multi-node cluster use an object store (s3://) or a folder mounted on every node"
        )


def remove_probe(probe: StoreProbe | None) -> None:
    if probe is not None:
        with contextlib.suppress(OSError):
            os.remove(probe.path)
