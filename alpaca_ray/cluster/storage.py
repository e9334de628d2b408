"""Paths that work on one machine and on a cluster: local paths, and ``s3://`` / ``gs://`` URIs.

Every artifact of every stage lives under one storage root shared by all nodes: a path every node mounts
(a local disk on one machine, NFS on a cluster) or an object-store URI. Stages read and write through
these functions, so the same config runs on a laptop and on a cluster whose nodes share only object
storage. Remote schemes go through pyarrow's filesystems (``FileSystem.from_uri``), so a URI may carry
pyarrow's query options, e.g. ``s3://bucket/run?endpoint_override=127.0.0.1:9000&scheme=http``; the
query always stays at the end of a URI (see :func:`join`). Credentials come from where pyarrow's SDKs
look for them (``AWS_*`` environment variables, instance roles, ``GOOGLE_APPLICATION_CREDENTIALS``...),
on every node that touches the root.

What "write" means:

- on a path, :func:`write_text` / :func:`write_bytes` write a temp file next to the target, fsync it and
  ``os.replace`` it over the target: a reader (or a crash) sees the old file or the new one, never half;
- on an object store, an upload becomes visible whole when it completes, which gives the same guarantee;
- object stores cannot append: :class:`AppendLog` keeps such a file in memory on its one writer and
  uploads it whole on ``flush()`` (see there).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit

_REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://")
#: Written inside each cached copy: the remote listing the copy was made from (for people debugging).
MANIFEST_NAME = ".alpaca_ray_manifest.json"
#: Environment variable naming the directory :func:`cached_local_copy` caches into.
CACHE_DIR_ENV = "ALPACA_RAY_CACHE_DIR"


def is_remote(path: str | os.PathLike) -> bool:
    """True for an object-store URI, False for a local path (or ``file://``)."""
    return str(path).startswith(_REMOTE_SCHEMES)


def is_posix(path: str | os.PathLike) -> bool:
    """True where plain file APIs work (a local or mounted path, ``file://``); False for URIs."""
    return not is_remote(path)


def split_query(path: str | os.PathLike) -> tuple[str, str]:
    """``(URI without its query, "?query" or "")``; local paths are never split (``?`` is a legal file name)."""
    path = str(path)
    if not is_remote(path) or "?" not in path:
        return path, ""
    head, query = path.split("?", 1)
    return head, "?" + query


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts, keeping URIs as URIs and a URI's ``?query`` at the end."""
    base = str(base)
    if is_remote(base):
        head, query = split_query(base)
        return posixpath.join(head, *parts) + query
    return os.path.join(base, *parts)


def basename(path: str | os.PathLike) -> str:
    """The last component of a path or URI (a trailing slash and a URI's query ignored)."""
    head, _ = split_query(path)
    return posixpath.basename(head.rstrip("/")) if is_remote(head) else os.path.basename(head.rstrip(os.sep))


def dirname(path: str | os.PathLike) -> str:
    """The parent of a path or URI; a URI keeps its query."""
    head, query = split_query(path)
    if is_remote(head):
        return posixpath.dirname(head.rstrip("/")) + query
    return os.path.dirname(head.rstrip(os.sep))


def local_path(path: str | os.PathLike) -> str:
    """A local path from ``path`` (strips ``file://``)."""
    path = str(path)
    return path[len("file://") :] if path.startswith("file://") else path


@functools.lru_cache(maxsize=32)
def _bucket_filesystem(root: str):
    from pyarrow import fs

    # Cached per bucket + options: from_uri may ask S3 for the bucket's region, one request per call.
    return fs.FileSystem.from_uri(root)


def _filesystem(path: str):
    """``(pyarrow filesystem, path inside it)`` for a URI or a local path."""
    from pyarrow import fs

    if not is_remote(path):
        return fs.LocalFileSystem(), os.path.abspath(local_path(path))
    parts = urlsplit(path)
    if parts.scheme in ("s3", "gs", "gcs"):
        filesystem, bucket = _bucket_filesystem(f"{parts.scheme}://{parts.netloc}"
                                                + (f"?{parts.query}" if parts.query else ""))
        key = unquote(parts.path).strip("/")
        return filesystem, f"{bucket}/{key}" if key else bucket
    return fs.FileSystem.from_uri(path)


def exists(path: str | os.PathLike) -> bool:
    path = str(path)
    if not is_remote(path):
        return os.path.exists(local_path(path))
    from pyarrow import fs

    filesystem, inner = _filesystem(path)
    return filesystem.get_file_info(inner).type != fs.FileType.NotFound


def makedirs(path: str | os.PathLike) -> None:
    path = str(path)
    if is_remote(path):
        filesystem, inner = _filesystem(path)
        filesystem.create_dir(inner, recursive=True)
    else:
        os.makedirs(local_path(path), exist_ok=True)


@contextmanager
def open_text(path: str | os.PathLike, mode: str = "r") -> Iterator[io.TextIOBase]:
    """Open a local or remote file as UTF-8 text (modes ``r``, ``w``, ``a``; ``a`` is local only)."""
    path = str(path)
    if not is_remote(path):
        with open(local_path(path), mode, encoding="utf-8") as handle:
            yield handle
        return
    filesystem, inner = _filesystem(path)
    if mode == "r":
        with filesystem.open_input_stream(inner) as raw:
            yield io.TextIOWrapper(raw, encoding="utf-8")
    elif mode == "w":
        with filesystem.open_output_stream(inner) as raw:
            wrapper = io.TextIOWrapper(raw, encoding="utf-8")
            yield wrapper
            wrapper.flush()
            wrapper.detach()
    else:
        raise ValueError(f"mode {mode!r} is not supported for remote path {path}; use storage.AppendLog")


def read_bytes(path: str | os.PathLike) -> bytes:
    path = str(path)
    if not is_remote(path):
        with open(local_path(path), "rb") as handle:
            return handle.read()
    filesystem, inner = _filesystem(path)
    try:
        with filesystem.open_input_stream(inner) as raw:
            return raw.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such object") from None


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; some filesystems (NFS, Windows) refuse it, which only costs durability.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: readers see the old content or the new, never a part.
    Missing parent folders of a local path are made."""
    path = str(path)
    if is_remote(path):
        filesystem, inner = _filesystem(path)
        with filesystem.open_output_stream(inner) as raw:  # the object appears when the upload completes
            raw.write(data)
        return
    target = os.path.abspath(local_path(path))
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    # Next to the target (same filesystem, so os.replace is a rename); opened "x" rather than mkstemp so the
    # file gets the umask's permissions, as a plain open() would, not mkstemp's 0600.
    temp = os.path.join(directory, f".{os.path.basename(target)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(directory)


def write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 :func:`write_bytes`."""
    write_bytes(path, text.encode("utf-8"))


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to a file. In place on a path; on an object store (no appends there) it downloads the
    object and uploads it whole with ``text`` added: correct for one writer, but each call costs the whole
    file, so a writer that appends often should hold an :class:`AppendLog` instead."""
    path = str(path)
    if not is_remote(path):
        target = os.path.abspath(local_path(path))
        os.makedirs(os.path.dirname(target), exist_ok=True)  # as on an object store, where no folders exist
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(text)
        return
    write_text(path, (read_text(path) if exists(path) else "") + text)


class AppendLog:
    """An append-only text file with one writer (``metrics.jsonl``), on a path or an object store.

    On a path (local, or a mount every node shares) each ``append`` goes straight to the file, as
    ``open(path, "a")`` would, and ``flush`` has nothing to do.

    An object store cannot append to an object. There the writer keeps the whole file in memory (the
    object's content when the log was opened, plus every append) and ``flush()`` uploads it whole,
    replacing the object; each upload is atomic, so readers see the last flushed state, never a torn file.
    ``append`` also flushes by itself once ``upload_every_s`` seconds have passed since the last upload, so
    a long run shows progress. Callers flush at each checkpoint: if the writer dies, the records it loses
    are of steps after the last checkpoint, the ones a resumed run redoes anyway. The memory held is the
    file's size (a few hundred bytes per logged step).
    """

    def __init__(self, path: str | os.PathLike, upload_every_s: float = 30.0):
        self.path = str(path)
        self.remote = is_remote(self.path)
        self.upload_every_s = upload_every_s
        self._buffer = io.StringIO()
        self._dirty = False
        self._last_upload = time.monotonic()
        if self.remote and exists(self.path):
            self._buffer.write(read_text(self.path))

    def append(self, text: str) -> None:
        if not self.remote:
            append_text(self.path, text)
            return
        self._buffer.write(text)
        self._dirty = True
        if time.monotonic() - self._last_upload >= self.upload_every_s:
            self.flush()

    def flush(self) -> None:
        """Make every append so far visible at ``path`` (an upload on an object store, if anything changed)."""
        if self.remote and self._dirty:
            write_text(self.path, self._buffer.getvalue())
            self._dirty = False
            self._last_upload = time.monotonic()

    def text(self) -> str:
        """Everything appended so far, flushed or not."""
        if self.remote:
            return self._buffer.getvalue()
        return read_text(self.path) if exists(self.path) else ""

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.flush()


def listdir(path: str | os.PathLike) -> list[str]:
    """Sorted names of the entries directly under a directory (or an object-store prefix)."""
    path = str(path)
    if not is_remote(path):
        return sorted(os.listdir(local_path(path)))
    from pyarrow import fs

    filesystem, inner = _filesystem(path)
    if filesystem.get_file_info(inner).type != fs.FileType.Directory:
        raise FileNotFoundError(f"{path}: no such directory")
    return sorted(info.base_name for info in filesystem.get_file_info(fs.FileSelector(inner, recursive=False)))


def remove(path: str | os.PathLike, missing_ok: bool = True) -> None:
    """Delete a file, or a directory with everything under it."""
    path = str(path)
    if not is_remote(path):
        target = local_path(path)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.unlink(target)
        elif not missing_ok:
            raise FileNotFoundError(path)
        return
    from pyarrow import fs

    filesystem, inner = _filesystem(path)
    kind = filesystem.get_file_info(inner).type
    if kind == fs.FileType.Directory:
        filesystem.delete_dir(inner)
    elif kind == fs.FileType.File:
        filesystem.delete_file(inner)
    elif not missing_ok:
        raise FileNotFoundError(path)


def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a local directory tree to ``uri`` (a URI or a path); files already there with the same names
    are replaced, others are left alone."""
    local_dir, uri = str(local_dir), str(uri)
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"{local_dir}: no such directory to upload")
    if not is_remote(uri):
        shutil.copytree(local_dir, local_path(uri), dirs_exist_ok=True)
        return
    from pyarrow import fs

    filesystem, inner = _filesystem(uri)
    fs.copy_files(os.path.abspath(local_dir), inner, source_filesystem=fs.LocalFileSystem(),
                  destination_filesystem=filesystem)


@contextmanager
def written_dir(out_dir: str | os.PathLike, prefix: str = "alpaca-ray-") -> Iterator[str]:
    """A local directory to write ``out_dir``'s files into: ``out_dir`` itself on a filesystem; for an object
    store, a temp dir that replaces ``out_dir`` (files of an earlier write removed) once the block ends
    without error, and is deleted either way."""
    out_dir = str(out_dir)
    if is_posix(out_dir):
        os.makedirs(local_path(out_dir), exist_ok=True)
        yield local_path(out_dir)
        return
    import tempfile

    local = tempfile.mkdtemp(prefix=prefix)
    try:
        yield local
        remove(out_dir)
        upload_dir(local, out_dir)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def download_dir(uri: str | os.PathLike, local_dir: str | os.PathLike) -> None:
    """Copy the tree under ``uri`` (a URI or a path) into the local directory ``local_dir``."""
    uri, local_dir = str(uri), str(local_dir)
    if not is_remote(uri):
        shutil.copytree(local_path(uri), local_dir, dirs_exist_ok=True)
        return
    from pyarrow import fs

    filesystem, inner = _filesystem(uri)
    if filesystem.get_file_info(inner).type != fs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such directory")
    os.makedirs(local_dir, exist_ok=True)
    fs.copy_files(inner, os.path.abspath(local_dir), source_filesystem=filesystem,
                  destination_filesystem=fs.LocalFileSystem())


def remote_manifest(uri: str | os.PathLike) -> dict[str, list[int]]:
    """``{relative name: [size, mtime in ns]}`` of every file under a URI: what tells a changed copy apart."""
    from pyarrow import fs

    uri = str(uri)
    filesystem, inner = _filesystem(uri)
    if filesystem.get_file_info(inner).type != fs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such directory")
    prefix = inner.rstrip("/") + "/"
    return {info.path[len(prefix):]: [info.size, info.mtime_ns or 0]
            for info in filesystem.get_file_info(fs.FileSelector(inner, recursive=True))
            if info.type == fs.FileType.File}


def default_cache_root() -> str:
    """``$ALPACA_RAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/alpaca-ray`` (``~/.cache/alpaca-ray``)."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return configured
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alpaca-ray")


def cached_local_copy(uri: str | os.PathLike, cache_root: str | os.PathLike | None = None,
                      attempts: int = 3) -> str:
    """A local directory holding the tree under ``uri``, downloaded once per node and content version.

    A local or mounted path is returned as it is. For a URI the copy lives at
    ``CACHE_ROOT/<name>-<hash of the URI>/<hash of the remote manifest>/``: the manifest is every file's
    name, size and modification time, so an unchanged remote tree maps to the same directory (no
    download), and a changed one (a model exported again) to a new one. A version directory appears
    only by an atomic rename of a finished download, and is never written after, so two processes on one
    node (two Serve replicas) can do this at once: both may download, one rename wins, both return the
    winner's directory, and nobody reads a half-written copy. Older versions are left in place (a replica
    may still be loading one); delete the cache directory to reclaim the space when nothing runs.
    """
    uri = str(uri)
    if not is_remote(uri):
        return local_path(uri)
    root = str(cache_root) if cache_root is not None else default_cache_root()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", basename(uri)) or "root"
    entry = os.path.join(root, f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}")
    for _ in range(attempts):
        manifest = remote_manifest(uri)
        if not manifest:
            raise FileNotFoundError(f"{uri}: no files there")
        version = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        target = os.path.join(entry, version)
        if os.path.isdir(target):
            return target
        os.makedirs(entry, exist_ok=True)
        temp = os.path.join(entry, f".download-{uuid.uuid4().hex[:12]}")
        try:
            download_dir(uri, temp)
            # The listing is taken before the download: a tree rewritten meanwhile may have given us a mix.
            if remote_manifest(uri) != manifest:
                continue
            with open(os.path.join(temp, MANIFEST_NAME), "w", encoding="utf-8") as handle:
                json.dump({"uri": uri, "files": manifest}, handle, indent=1, sort_keys=True)
            try:
                os.rename(temp, target)
            except OSError:
                # Another process renamed its copy of the same version first (the target is not empty).
                if not os.path.isdir(target):
                    raise
            return target
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    raise RuntimeError(f"{uri} changed during each of {attempts} downloads; try again when nothing writes to it")
