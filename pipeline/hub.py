"""Real-scale weights and data: a local folder, or a Hugging Face hub id checked before anything loads.

`from_pretrained` on an unreachable hub retries for about a minute per file before it fails (measured here: 50 s
for one ViT), and a gated repository (FLUX.1-dev) fails only after partial downloads. `check` makes one
authenticated request first (about 0.2 s) and turns every failure into a `ConfigError` that says what is
missing and how to provide it, so a real-scale stage stops within seconds and writes nothing.
"""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError

HOW = ("log in with `huggingface-cli login` (or set HF_TOKEN), accept the model's licence on its hub page, "
       "or download it and set {key} to the local folder")


def check(name: str, key: str, repo_type: str = "model") -> str:
    """`name` if it is a local folder or file; otherwise a hub id that this process may download (reachable,
    existing, licence accepted). Raises ConfigError naming the params key `key` otherwise."""
    if not name:
        raise ConfigError(f"params.yaml: {key} is empty; give a hub id or a local path")
    if Path(name).exists():
        return name
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ConfigError(f"params.yaml: {key}={name!r}: no such local path, and not a hub id (owner/name)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    if _cached(name, repo_type):
        return name
    try:
        HfApi().auth_check(name, repo_type=repo_type)
    except GatedRepoError:
        raise ConfigError(f"params.yaml: {key}={name!r} is gated and this account has not accepted its licence: "
                          + HOW.format(key=key)) from None
    except RepositoryNotFoundError:
        raise ConfigError(f"params.yaml: {key}={name!r}: no such {repo_type} on the hub, or it is private and "
                          f"you are not logged in: " + HOW.format(key=key)) from None
    except Exception as e:   # network errors come from httpx/requests/OSError depending on the backend
        raise ConfigError(f"params.yaml: {key}={name!r}: the Hugging Face hub cannot be reached "
                          f"({type(e).__name__}: {str(e)[:120]}); " + HOW.format(key=key)) from None
    return name


def _cached(name: str, repo_type: str) -> bool:
    """True when the hub cache already holds a snapshot of `name` (runs offline with HF_HUB_OFFLINE=1)."""
    try:
        from huggingface_hub import scan_cache_dir
        return any(r.repo_id == name and r.repo_type == repo_type for r in scan_cache_dir().repos)
    except Exception:   # no cache directory yet
        return False
