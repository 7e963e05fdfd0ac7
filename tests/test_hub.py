"""``hf://`` references end to end: a real ``huggingface_hub`` client against a local Hub.

The Hub is ``tests/hub_server.py`` on loopback (``HF_ENDPOINT``), serving real folders:
the tiny SIMS checkpoint, and a speech tokenizer repository whose centroids sit in a
sub-folder. Every run is a real ``slm-lens extract`` process, since the client reads its
endpoint, cache and offline settings when it is imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from analysis.store import open_store
from extractor.models.hub import HubError, parse_hub_uri

from .hub_server import HubServer
from .service_helpers import small_config
from .test_watch import _checkpoint

pytestmark = pytest.mark.slow

SHA1, SHA2 = "1" * 40, "2" * 40
TOKEN = "hf_never_anywhere_0123456789"


def test_hub_references_parse():
    ref = parse_hub_uri("hf://org/name")
    assert (ref.repo_id, ref.revision, ref.path) == ("org/name", "main", "")
    ref = parse_hub_uri("hf://org/name@v1.0/sub/dir/file.npy")
    assert (ref.repo_id, ref.revision, ref.path) == ("org/name", "v1.0", "sub/dir/file.npy")
    assert ref.at("abc") == "hf://org/name@abc/sub/dir/file.npy"
    for bad in ("hf://org", "hf://", "hf://org/@main"):
        with pytest.raises(HubError, match="hf://org/name"):
            parse_hub_uri(bad)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    raw = small_config(str(root / "unused"), root / "data")
    v1 = _checkpoint(root / "sims-v1", 1)
    v2 = _checkpoint(root / "sims-v2", 2)
    speech = root / "mhubert"
    shutil.copytree(raw["speech"]["model"], speech)
    (speech / "kmeans").mkdir()
    shutil.copy(raw["speech"]["centroids"], speech / "kmeans" / "centroids.npy")
    server = HubServer()
    server.branches[("slprl/tiny-sims", "main")] = (SHA1, v1)
    server.branches[("slprl/tiny-mhubert", "main")] = ("3" * 40, speech)
    raw["model"]["path"] = "hf://slprl/tiny-sims"
    raw["model"].pop("name", None)
    raw["speech"]["model"] = "hf://slprl/tiny-mhubert"
    raw["speech"]["centroids"] = "hf://slprl/tiny-mhubert/kmeans/centroids.npy"
    yield server, raw, root, v2
    server.close()


def _hub_env(server, cache, offline=False) -> dict[str, str]:
    """This process's environment pointed at the local Hub (the suite itself runs offline)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_XET": "1"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _extract(raw, store, cache, server, offline=False):
    config = store.parent / f"run-{len(list(store.parent.glob('run-*')))}.yaml"
    config.write_text(yaml.safe_dump({**raw, "store": str(store)}))
    env = {**_hub_env(server, cache, offline), "HF_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "extractor.cli", "extract", str(config), "--in-process"]
    proc = subprocess.run([*cmd, "--no-progress"], env=env, capture_output=True, text=True)
    assert TOKEN not in proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_runs_pin_the_commit_and_a_moved_branch_is_a_new_run(hub, tmp_path):
    server, raw, _root, v2 = hub
    store, cache = tmp_path / "store", tmp_path / "cache"
    _extract(raw, store, cache, server)
    first = open_store(str(store)).sql("SELECT run_id, revision, config FROM runs").fetchall()
    ((run1, revision1, config1),) = first
    assert revision1 == SHA1
    pinned = json.loads(config1)
    assert pinned["model"]["path"] == f"hf://slprl/tiny-sims@{SHA1}"
    assert (
        pinned["speech"]["centroids"] == f"hf://slprl/tiny-mhubert@{'3' * 40}/kmeans/centroids.npy"
    )
    assert any("/resolve/" in r and "centroids.npy" in r for r in server.requests)
    # The driver fetched config and tokenizer only; the worker fetched the weights once.
    weights = [r for r in server.requests if r.startswith("GET") and "model.safetensors" in r]
    assert len([r for r in weights if "tiny-sims" in r]) == 1

    server.branches[("slprl/tiny-sims", "main")] = (SHA2, v2)  # a new commit on main
    _extract(raw, store, cache, server)
    runs = dict(open_store(str(store)).sql("SELECT run_id, revision FROM runs").fetchall())
    assert len(runs) == 2 and runs[run1] == SHA1
    (run2,) = set(runs) - {run1}
    assert runs[run2] == SHA2

    # Offline, from the cache: the same commit, so the same run, already done.
    server.requests.clear()
    proc = _extract(raw, store, cache, server, offline=True)
    assert not server.requests, "offline runs never call the Hub"
    assert "5 already committed" in proc.stdout + proc.stderr
    for path in store.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_a_missing_reference_is_a_clear_error(hub, tmp_path):
    server, raw, _root, _ = hub
    bad = {**raw, "model": {**raw["model"], "path": "hf://slprl/no-such-model"}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**bad, "store": str(tmp_path / "store")}))
    env = _hub_env(server, tmp_path / "c")
    proc = subprocess.run(
        [sys.executable, "-m", "extractor.cli", "extract", str(config), "--in-process"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "hf://slprl/no-such-model" in proc.stderr


def test_the_watcher_sees_one_checkpoint_per_branch_head(hub, tmp_path):
    server, _raw, _root, v2 = hub
    server.branches[("slprl/tiny-sims", "exp")] = ("4" * 40, v2)
    script = (
        "import json; from extractor.watch import list_checkpoints, checkpoint_complete; "
        "c = list_checkpoints('hf://slprl/tiny-sims'); "
        "print(json.dumps([[x.uri, x.name, checkpoint_complete(x.uri)[0]] for x in c]))"
    )
    env = _hub_env(server, tmp_path / "c")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    listed = json.loads(out.stdout.strip().splitlines()[-1])
    main_sha = server.branches[("slprl/tiny-sims", "main")][0]
    assert listed == [
        [f"hf://slprl/tiny-sims@{'4' * 40}", f"exp@{'4' * 8}", True],
        [f"hf://slprl/tiny-sims@{main_sha}", f"main@{main_sha[:8]}", True],
    ]
