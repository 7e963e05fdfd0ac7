"""Run configs: validation names the bad field; run ids are deterministic."""

from __future__ import annotations

import pytest
import yaml

from extractor.config import ConfigError, load_config, parse_config

BASE = {"model": {"path": "/m"}, "dataset": {"manifest": "/d.jsonl"}, "store": "/s"}


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"lens": {"k": 0}}, "lens.k"),
        ({"lens": {"positions": "some"}}, "lens.positions"),
        ({"model": {"path": "/m", "dtype": "int8"}}, "model.dtype"),
        ({"model": {"path": "/m", "colour": "red"}}, "model.colour"),
        ({"speech": {"kind": "hubert-kmeans"}}, "speech.model"),
        ({"prompt": {"mode": "sing"}}, "prompt.mode"),
        ({"workers": {"count": 0}}, "workers.count"),
        ({"shard_size": -1}, "shard_size"),
        ({"gpu": 1}, "gpu"),
        ({"lens": [1, 2]}, "lens"),
    ],
)
def test_bad_fields_are_named(patch, field):
    with pytest.raises(ConfigError, match=rf"^{field}\b"):
        parse_config({**BASE, **patch})


def test_missing_sections():
    with pytest.raises(ConfigError, match=r"^model: is required"):
        parse_config({"dataset": {"manifest": "x"}})


def test_relative_paths_resolve_against_the_config(tmp_path):
    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump({**BASE, "model": {"path": "ckpt"}, "store": "out"})
    )
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.model.path == str(tmp_path / "ckpt") and cfg.store == str(tmp_path / "out")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "nope.yaml")


def test_content_hash_ignores_where_and_how_many():
    a = parse_config(BASE)
    b = parse_config({**BASE, "store": "s3://elsewhere", "workers": {"count": 8, "gpus": 1}})
    c = parse_config({**BASE, "lens": {"k": 20}})
    assert a.content_hash() == b.content_hash() != c.content_hash()
