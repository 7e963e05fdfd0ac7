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
        # Issue 11's list: each passed or crashed later before.
        ({"workers": {"gpus": "one"}}, "workers.gpus"),
        ({"workers": {"max_retries": "3"}}, "workers.max_retries"),
        ({"workers": {"in_flight_per_worker": 0}}, "workers.in_flight_per_worker"),
        ({"workers": {"cpus": 0}}, "workers.cpus"),
        ({"prompt": {"rule": {"kind": "poisson", "mean_spn": 2}}}, "prompt.rule.mean_spn"),
        ({"prompt": {"rule": {"n": 0}}}, "prompt.rule.n"),
        ({"prompt": {"rule": {"kind": "flags"}}}, "prompt.rule.flags"),
        ({"prompt": {"rule": {"kind": "flags", "flags": [1, 0]}}}, "prompt.rule.flags"),
        ({"prompt": {"rule": {"start": "song"}}}, "prompt.rule.start"),
        ({"prompt": {"rule": {"kind": "poisson", "mean_span": -1}}}, "prompt.rule.mean_span"),
        ({"model": {"path": "/m", "layout": "simz"}}, "model.layout"),
        ({"model": {"path": "/m", "layout": {"n_units": 5}}}, "model.layout"),
        ({"model": {"path": "/m", "layout": 3}}, "model.layout"),
        ({"lens": {"k": True}}, "lens.k"),
        ({"lens": {"engine": "cuda"}}, "lens.engine"),
        ({"target_file_mb": 0}, "target_file_mb"),
        ({"model": {"path": 123}}, "model.path"),
        ({"model": {"path": "/m", "allow_pickle": "yes"}}, "model.allow_pickle"),
        ({"store": 5}, "store"),
        ({"speech": {"layer": "11"}}, "speech.layer"),
        ({"prompt": {"control_seed": 1.5}}, "prompt.control_seed"),
    ],
)
def test_bad_fields_are_named(patch, field):
    with pytest.raises(ConfigError, match=rf"^{field}\b"):
        parse_config({**BASE, **patch})


def test_spirit_lm_expressive_is_refused_with_the_reason():
    raw = {**BASE, "model": {"path": "/m", "layout": "spirit-lm-expressive"}}
    with pytest.raises(ConfigError, match=r"^model.layout: Spirit LM Expressive is not supported"):
        parse_config(raw)


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


def test_bad_config_exits_2_before_anything_runs(tmp_path, capsys):
    from extractor.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "workers": {"gpus": "one"}}))
    assert main(["extract", str(path)]) == 2
    assert "workers.gpus" in capsys.readouterr().err


def test_the_engine_does_not_change_the_run_id():
    a = parse_config({**BASE, "lens": {"engine": "torch"}})
    b = parse_config({**BASE, "lens": {"engine": "triton"}})
    assert a.content_hash() == b.content_hash()
