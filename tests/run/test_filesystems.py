"""``run/filesystems.py``: one path type for local folders and pyarrow URIs, tested on a real
S3 server (moto's server mode on 127.0.0.1, the session's ``s3`` fixture) and on local disk."""

from __future__ import annotations

import os
import stat

import pytest
from medalign_platform.run.filesystems import StoragePath, is_uri, join, mirror, mirror_dir, normalize, relocate


@pytest.mark.parametrize("location, names, expected", [
    ("s3://bucket/a/", ("b", "c.json"), "s3://bucket/a/b/c.json"),
    ("s3://bucket?endpoint_override=127.0.0.1:9000&scheme=http", ("exp",),
     "s3://bucket/exp?endpoint_override=127.0.0.1:9000&scheme=http"),
    ("gs://bucket/prefix", ("/trial_1/",), "gs://bucket/prefix/trial_1"),
    ("/data/sweeps/", ("exp",), "/data/sweeps/exp"),
])
def test_join_puts_names_before_the_query(location, names, expected):
    assert join(location, *names) == expected


def test_local_locations_are_absolute_and_file_uris_are_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize("sweeps") == str(tmp_path / "sweeps")
    assert normalize(f"file://{tmp_path}/x") == str(tmp_path / "x") and not is_uri(f"file://{tmp_path}")
    assert normalize("~/x") == os.path.expanduser("~/x")
    place = StoragePath("sweeps") / "exp"
    assert not place.is_remote and place.local() == tmp_path / "sweeps" / "exp" and place.name == "exp"


def test_remote_files_are_written_read_listed_and_removed(s3):
    exp = StoragePath(s3.uri("unit", "exp"))
    assert exp.is_remote and exp.name == "exp" and str(exp.parent) == s3.uri("unit")
    assert not exp.exists()
    (exp / "sweep.json").write_json({"b": 1, "a": [1, 2]})
    (exp / "trial_x" / "final.json").write_text('{"step": 2}')
    assert exp.is_dir() and (exp / "sweep.json").is_file() and not (exp / "sweep.json").is_dir()
    assert (exp / "sweep.json").read_json() == {"a": [1, 2], "b": 1}
    assert (exp / "sweep.json").read_text() == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}'  # sorted keys, indent 1
    assert sorted(exp.files()) == ["sweep.json", "trial_x/final.json"]
    assert exp.files()["trial_x/final.json"][0] == len('{"step": 2}')
    assert sorted(p.name for p in exp.iterdir()) == ["sweep.json", "trial_x"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        (exp / "missing.json").read_text()
    (exp / "trial_x").remove()
    assert sorted(exp.files()) == ["sweep.json"] and (exp / "trial_x" / "final.json").size() is None


def test_upload_and_mirror_copy_only_what_changed(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDALIGN_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "run"
    (source / "tensorboard").mkdir(parents=True)
    (source / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x" * 100)
    (source / "config.json").write_text("{}")
    (source / ".config.json.1234.tmp").write_text("half")  # an atomic write's leftover: never copied
    remote = StoragePath(s3.uri("unit", "run"))
    assert remote.upload(source) == 2
    assert remote.upload(source) == 0  # nothing changed
    assert sorted(remote.files()) == ["config.json", "tensorboard/events.out.tfevents.1"]

    local = mirror(remote, skip=lambda relative: relative.startswith("tensorboard/"))
    assert local == mirror_dir(remote) and local.is_relative_to(tmp_path / "cache" / "remote")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == ["config.json"]
    assert stat.S_IMODE(local.stat().st_mode) == 0o700  # the mirror is private
    (remote / "summary.json").write_text('{"done": true}')
    (remote / "config.json").remove()
    mirror(remote, skip=lambda relative: relative.startswith("tensorboard/"))
    assert sorted(p.name for p in local.iterdir()) == ["summary.json"]  # new file fetched, deleted one pruned
    assert (local / "summary.json").read_text() == '{"done": true}'

    (source / "tensorboard" / "events.out.tfevents.2").write_bytes(b"y")
    assert (remote / "tensorboard").upload(source / "tensorboard", replace=True) == 2
    assert sorted((remote / "tensorboard").files()) == ["events.out.tfevents.1", "events.out.tfevents.2"]


def test_local_writes_are_atomic_and_private_folders_are_0700(tmp_path):
    folder = StoragePath(tmp_path / "exp").mkdir(private=True)
    assert stat.S_IMODE(os.stat(folder.uri).st_mode) == 0o700
    (folder / "a.json").write_json({"x": 1})
    (folder / "b.bin").write_bytes(b"\x00\x01")
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["a.json", "b.bin"]  # no temporary left
    assert (folder / "b.bin").read_bytes() == b"\x00\x01" and (folder / "a.json").read_json() == {"x": 1}


def test_relocate_rewrites_paths_inside_the_mirror_only(tmp_path):
    local = tmp_path / "mirror" / "exp"
    value = {"path": str(local / "trial_1"), "list": [str(local), "/elsewhere"], "n": 3,
             "near": str(local) + "-other"}
    assert relocate(value, local, "s3://b/sweeps/exp") == {
        "path": "s3://b/sweeps/exp/trial_1", "list": ["s3://b/sweeps/exp", "/elsewhere"], "n": 3,
        "near": str(local) + "-other"}


def test_a_scheme_pyarrow_does_not_know_is_one_clear_error():
    from medalign_platform.common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"cannot open storage 'nosuchfs://x'.*use a local path or a URI"):
        StoragePath("nosuchfs://x/y")


def test_pyarrow_options_in_the_query_string_reach_the_store(s3, monkeypatch):
    """``s3://bucket/prefix?endpoint_override=...&scheme=http`` works without AWS_ENDPOINT_URL."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    endpoint = s3.endpoint.removeprefix("http://")
    place = StoragePath(f"s3://{s3.bucket}/query?endpoint_override={endpoint}&scheme=http") / "exp"
    assert str(place) == f"s3://{s3.bucket}/query/exp?endpoint_override={endpoint}&scheme=http"
    (place / "sweep.json").write_json({"ok": True})
    assert (place / "sweep.json").read_json() == {"ok": True}
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert StoragePath(s3.uri("query", "exp", "sweep.json")).read_json() == {"ok": True}  # the same object


def test_a_changed_endpoint_is_not_served_from_the_cache(s3):
    """Filesystems are cached per bucket and storage environment: with AWS_ENDPOINT_URL pointing
    at another S3 server the object is not found there, and back again it is."""
    from storage_servers import s3_server

    (StoragePath(s3.uri("cache")) / "x.json").write_json({"n": 1})
    with s3_server(bucket="another") as other:  # sets AWS_ENDPOINT_URL to the other server for the block
        assert os.environ["AWS_ENDPOINT_URL"] == other.endpoint != s3.endpoint
        assert not StoragePath(s3.uri("cache", "x.json")).exists()
    assert StoragePath(s3.uri("cache", "x.json")).read_json() == {"n": 1}
