"""Where a model named on the command line lives: a local directory, or a name on the Hugging Face hub.

One rule for every stage that takes a model (train's ``--base-model``, serve's ``--model``), checked on the
driver before any cluster starts. Without it, a path that does not exist reaches ``from_pretrained``, which
takes it for a malformed hub name ("Repo id must be in the form..."), and a hub name on a machine that
cannot reach the hub is retried for half a minute with a warning line per retry.
"""

from __future__ import annotations

import os

from alpaca_ray.cluster import storage
from alpaca_ray.config import UserError

#: Seconds the one reachability request to the hub may take.
HUB_TIMEOUT_S = 5.0


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path: absolute, ``./``, ``../`` or ``~``, or inside a directory
    that exists (``runs/tiny-base`` when ``runs/`` is there); else it is a hub name (``org/model``)."""
    if name.startswith(("/", "./", "../", "~")) or name in (".", ".."):
        return True
    parent = os.path.dirname(name.rstrip("/"))
    return bool(parent) and os.path.isdir(parent)


def is_cached(name: str) -> bool:
    """Whether the hub model ``name`` is in this machine's Hugging Face cache (its config.json at least)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id: nothing of it can be cached
        return False


def hub_unreachable_reason() -> str | None:
    """None when the hub answers (any HTTP status); else why it cannot be asked (offline mode, or the
    connection error). One request, never retried."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - DNS, refused, time-out, proxy: no answer at all
        return f"{constants.ENDPOINT}: {type(err).__name__}: {str(err)[:200]}"
    return None


def check_model_exists(name: str, flag: str) -> None:
    """Raise :class:`UserError` for a model that cannot be loaded from anywhere: a path that does not exist,
    or a hub name that is neither in the local cache nor downloadable because the hub is unreachable.

    An object-store URI is left to the stage (it checks its files itself).
    """
    if not name or storage.is_remote(name) or os.path.exists(os.path.expanduser(name)):
        return
    if looks_like_path(name):
        raise UserError(f"{flag}: no such model directory: {name} (give the directory holding the model's "
                        "config.json, or a Hugging Face hub name such as org/model)")
    if is_cached(name):
        return
    reason = hub_unreachable_reason()
    if reason:
        raise UserError(f"{flag} {name}: not found locally and the hub is unreachable ({reason}); download it "
                        f"where the hub is reachable (huggingface-cli download {name}) or give a local model "
                        "directory")
