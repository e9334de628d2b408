"""Where the seed tasks and the prompt header come from: a local file, or an ``http(s)://`` URL fetched once.

Stanford's ``seed_tasks.jsonl`` and ``prompt.txt`` are not ours to bundle, so a recipe names them where
they are published (with a pinned commit in the URL). A URL is fetched once into ``OUTPUT/sources/`` and
read from there ever after, so a resumed run reads the very bytes the first one did; each source's
SHA-256 goes into ``stats.json``, and ``--dry-run`` shows it.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from alpaca_ray.cluster import storage
from alpaca_ray.config import UserError

#: Larger than any seed-task file or prompt header; a URL answering with more is not one.
MAX_SOURCE_BYTES = 64 * 1024 * 1024
FETCH_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Source:
    """One input file: what the config named, the local file read, and the SHA-256 of its bytes."""

    location: str
    path: str
    sha256: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def is_url(location: str) -> bool:
    return str(location).startswith(("https://", "http://"))


def cache_path(url: str, cache_dir: str) -> str:
    """Where ``url`` is kept under ``cache_dir``: its file name behind a digest of the whole URL."""
    name = os.path.basename(urlsplit(url).path) or "index"
    return storage.join(cache_dir, f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}")


def fetch(url: str, what: str) -> bytes:
    """The bytes at ``url``; a clear error naming the URL when it cannot be had."""
    request = urllib.request.Request(url, headers={"User-Agent": "alpaca-ray"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(MAX_SOURCE_BYTES + 1)
    except urllib.error.HTTPError as err:
        raise UserError(f"{url}: HTTP {err.code} {err.reason} while fetching the {what}; check the URL") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"cannot fetch the {what} from {url}: {reason}") from None
    if len(data) > MAX_SOURCE_BYTES:
        raise UserError(f"{url}: more than {MAX_SOURCE_BYTES // 2**20} MiB; not a {what}")
    if not data.strip():
        raise UserError(f"{url}: the {what} is empty")
    return data


def resolve(location: str, cache_dir: str, what: str) -> Source:
    """A local path as it is (hashed when readable: a missing one is reported by its reader), or a URL's
    cached copy under ``cache_dir``, fetched first if it is not there yet."""
    if not is_url(location):
        try:
            with open(location, "rb") as handle:
                return Source(location, location, hashlib.sha256(handle.read()).hexdigest())
        except OSError:
            return Source(location, location, None)
    path = cache_path(location, cache_dir)
    if storage.exists(path):
        data = storage.read_bytes(path)
    else:
        data = fetch(location, what)
        storage.makedirs(cache_dir)
        storage.write_bytes(path, data)  # atomic: a crash never leaves half a file to be trusted later
    return Source(location, path, hashlib.sha256(data).hexdigest())
