"""``alpaca_ray.cluster.storage`` against a local directory and a real S3 server (moto), the same tests on both."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from alpaca_ray.cluster import storage
from tests.support.object_store import ObjectStore, object_store  # noqa: F401 - the fixture

QUERY = "?endpoint_override=127.0.0.1:9000&scheme=http"


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A fresh storage root: a local directory, or a fresh prefix in the moto bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("object_store").fresh_uri("unit")


def test_join_keeps_a_uri_query_at_the_end_and_local_paths_plain():
    assert storage.join("s3://bkt/run" + QUERY, "final", "config.json") == "s3://bkt/run/final/config.json" + QUERY
    assert storage.join("s3://bkt/run/", "a") == "s3://bkt/run/a"
    assert storage.join("/data/run", "a", "b") == os.path.join("/data/run", "a", "b")
    assert storage.join("/data/odd?name", "a") == os.path.join("/data/odd?name", "a")  # '?' is a file name here
    assert storage.basename("s3://bkt/run/final/" + QUERY) == "final"
    assert storage.dirname("s3://bkt/run/final" + QUERY) == "s3://bkt/run" + QUERY
    assert storage.is_posix("/data/run") and storage.is_posix("file:///data") and storage.is_posix("rel/dir")
    assert not storage.is_posix("s3://bkt/run") and not storage.is_posix("gs://bkt/run")


def test_text_and_bytes_round_trip_listing_and_remove(root):
    storage.write_text(storage.join(root, "a", "config.json"), '{"x": 1}')
    storage.write_bytes(storage.join(root, "a", "blob.bin"), b"\x00\x01")
    storage.write_text(storage.join(root, "top.txt"), "first")
    storage.write_text(storage.join(root, "top.txt"), "second, longer")  # replaced, not appended to
    assert storage.read_text(storage.join(root, "top.txt")) == "second, longer"
    assert storage.read_bytes(storage.join(root, "a", "blob.bin")) == b"\x00\x01"
    assert storage.listdir(root) == ["a", "top.txt"]
    assert storage.listdir(storage.join(root, "a")) == ["blob.bin", "config.json"]

    storage.remove(storage.join(root, "a", "blob.bin"))
    assert storage.listdir(storage.join(root, "a")) == ["config.json"]
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a")) and storage.listdir(root) == ["top.txt"]
    storage.remove(storage.join(root, "nothing-here"))  # missing is fine by default...
    with pytest.raises(FileNotFoundError):
        storage.remove(storage.join(root, "nothing-here"), missing_ok=False)
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.read_text(storage.join(root, "nope.txt"))
    with pytest.raises(FileNotFoundError):
        storage.listdir(storage.join(root, "no-dir"))


def test_append_text_and_append_log(root):
    path = storage.join(root, "metrics.jsonl")
    storage.makedirs(root)
    storage.append_text(path, "1\n")
    storage.append_text(path, "2\n")
    assert storage.read_text(path) == "1\n2\n"

    log = storage.AppendLog(path, upload_every_s=3600)  # no upload by the clock during this test
    log.append("3\n")
    log.append("4\n")
    assert log.text() == "1\n2\n3\n4\n"
    # A path is appended in place; an object store only sees the appends once flushed (uploaded whole).
    assert storage.read_text(path) == ("1\n2\n" if storage.is_remote(root) else "1\n2\n3\n4\n")
    log.flush()
    assert storage.read_text(path) == "1\n2\n3\n4\n"
    with storage.AppendLog(path) as reopened:  # a resumed writer continues the file
        reopened.append("5\n")
    assert storage.read_text(path) == "1\n2\n3\n4\n5\n"

    eager = storage.AppendLog(storage.join(root, "eager.jsonl"), upload_every_s=0)
    eager.append("a\n")  # the interval has passed: visible without a flush
    assert storage.read_text(storage.join(root, "eager.jsonl")) == "a\n"


def test_upload_and_download_a_tree(root, tmp_path):
    source = tmp_path / "source"
    (source / "sub" / "deeper").mkdir(parents=True)
    (source / "top.json").write_text("{}")
    (source / "sub" / "deeper" / "w.bin").write_bytes(b"w" * 1000)
    target = storage.join(root, "tree")
    storage.upload_dir(source, target)
    assert storage.listdir(target) == ["sub", "top.json"]
    assert storage.read_bytes(storage.join(target, "sub", "deeper", "w.bin")) == b"w" * 1000

    back = tmp_path / "back" / "nested"  # parents are made
    storage.download_dir(target, back)
    files = {str(p.relative_to(back)): p.read_bytes() for p in back.rglob("*") if p.is_file()}
    assert files == {"top.json": b"{}", os.path.join("sub", "deeper", "w.bin"): b"w" * 1000}
    with pytest.raises(FileNotFoundError):
        storage.upload_dir(tmp_path / "missing", target)
    with pytest.raises(FileNotFoundError):
        storage.download_dir(storage.join(root, "missing"), tmp_path / "x")


def test_local_writes_are_atomic_and_leave_no_temp_files(tmp_path):
    path = tmp_path / "out" / "summary.json"
    storage.write_text(path, "old")
    storage.write_text(path, "new")
    assert path.read_text() == "new" and os.listdir(path.parent) == ["summary.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600

    blocked = tmp_path / "out" / "is-a-dir"
    (blocked / "child").mkdir(parents=True)
    with pytest.raises(OSError):
        storage.write_text(blocked, "cannot replace a non-empty directory")
    assert sorted(os.listdir(tmp_path / "out")) == ["is-a-dir", "summary.json"]  # the temp file is gone


def _make_tree(store: ObjectStore, name: str) -> str:
    uri = store.fresh_uri(name)
    storage.write_text(storage.join(uri, "config.json"), '{"model_type": "llama"}')
    storage.write_bytes(storage.join(uri, "weights", "part-0.bin"), b"0" * 4096)
    return uri


def test_cached_local_copy_is_stable_until_the_remote_copy_changes(object_store, tmp_path):  # noqa: F811
    uri = _make_tree(object_store, "cache")
    cache = tmp_path / "cache"
    first = storage.cached_local_copy(uri, cache)
    assert open(os.path.join(first, "config.json")).read() == '{"model_type": "llama"}'
    assert os.path.getsize(os.path.join(first, "weights", "part-0.bin")) == 4096
    marker = os.path.join(first, "marker")
    open(marker, "w").close()
    assert storage.cached_local_copy(uri, cache) == first and os.path.exists(marker)  # not downloaded again

    storage.write_text(storage.join(uri, "config.json"), '{"model_type": "llama", "changed": true}')
    second = storage.cached_local_copy(uri, cache)
    assert second != first and '"changed": true' in open(os.path.join(second, "config.json")).read()
    assert os.path.exists(marker)  # the older copy is left for whoever may still be reading it
    entry = os.path.dirname(first)
    assert sorted(os.listdir(entry)) == sorted([os.path.basename(first), os.path.basename(second)])

    other = storage.cached_local_copy(_make_tree(object_store, "cache"), cache)
    assert os.path.dirname(other) != entry  # keyed by the URI


def test_concurrent_cached_local_copies_agree_and_leave_no_partial_download(object_store, tmp_path):  # noqa: F811
    uri = _make_tree(object_store, "race")
    cache = tmp_path / "cache"
    start = threading.Barrier(4)

    def fetch(_: int) -> str:
        start.wait()  # all four list and download at the same moment, like replicas starting together
        return storage.cached_local_copy(uri, cache)

    with ThreadPoolExecutor(4) as pool:
        paths = set(pool.map(fetch, range(4)))
    assert len(paths) == 1
    (path,) = paths
    assert os.path.getsize(os.path.join(path, "weights", "part-0.bin")) == 4096
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # the losers' downloads are removed


def test_cached_local_copy_of_a_path_or_a_missing_uri(object_store, tmp_path):  # noqa: F811
    assert storage.cached_local_copy(str(tmp_path)) == str(tmp_path)  # already on this node
    missing = object_store.fresh_uri("missing")
    with pytest.raises(FileNotFoundError, match="missing-"):
        storage.cached_local_copy(missing, tmp_path / "cache")
