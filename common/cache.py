"""The on-disk cache for expensive intermediates, keyed by a hash of everything they depend on."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

CACHE_ENV = "UNFAMILIAR_CACHE"


def cache_root() -> Path:
    """`$UNFAMILIAR_CACHE`, else `~/.cache/unfamiliar-finetuning`."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "unfamiliar-finetuning"
    return Path(root)


def canonical(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_hash(*parts: Any, length: int = 16) -> str:
    """A stable hash of dataclasses, dicts, lists and scalars (key order does not matter)."""
    payload = json.dumps([canonical(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def cache_dir(kind: str, *parts: Any) -> Path:
    """The cache folder for one intermediate: `<root>/<kind>/<hash of parts>` (not created)."""
    return cache_root() / kind / config_hash(*parts)
