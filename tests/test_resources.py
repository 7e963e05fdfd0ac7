"""Remote model files reach a worker as local paths: folders and single files, from S3."""

from __future__ import annotations

from pathlib import Path

from analysis.storage import s3_filesystem
from extractor.service.resources import materialize


def test_s3_files_and_folders_are_cached_locally(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("SLM_LENS_CACHE", str(tmp_path / "cache"))
    fs = s3_filesystem()
    for name, data in (("config.json", b"{}"), ("kmeans500.npy", b"\x93NUMPY-ish")):
        with fs.open_output_stream(f"{s3_env}/models/hubert/{name}") as f:
            f.write(data)
    folder = materialize(f"s3://{s3_env}/models/hubert")
    assert sorted(p.name for p in Path(folder).iterdir()) == [
        "config.json",
        "kmeans500.npy",
    ]
    single = materialize(f"s3://{s3_env}/models/hubert/kmeans500.npy")
    assert single.endswith("/kmeans500.npy") and Path(single).read_bytes() == b"\x93NUMPY-ish"
    assert materialize(f"s3://{s3_env}/models/hubert/kmeans500.npy") == single  # cached
