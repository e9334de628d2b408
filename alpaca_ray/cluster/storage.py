"""Paths that work on one machine and on a cluster: local paths, and ``s3://`` / ``gs://`` URIs.

Stages hand their outputs over through these, so the same config runs on a laptop and on a cluster
whose nodes share only object storage. Remote schemes go through pyarrow's filesystems.
"""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager

_REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://")


def is_remote(path: str | os.PathLike) -> bool:
    """True for an object-store URI, False for a local path (or ``file://``)."""
    return str(path).startswith(_REMOTE_SCHEMES)


def _filesystem(path: str):
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(path)
    return filesystem, inner


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts, keeping URIs as URIs."""
    base = str(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def local_path(path: str | os.PathLike) -> str:
    """A local path from ``path`` (strips ``file://``)."""
    path = str(path)
    return path[len("file://") :] if path.startswith("file://") else path


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
        raise ValueError(f"mode {mode!r} is not supported for remote path {path}")
