"""Generated files (VLM configs, tokenizers, converted checkpoints, extracted model code) live in a
content-addressed cache directory: the name is a hash of what went into them, so they never go stale,
and each is written to a temporary sibling and renamed into place, so a crash never leaves half of one."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where generated config / tokenizer directories live (``$VLAPRUNE_CACHE`` or ~/.cache/vlaprune)."""
    root = os.environ.get("VLAPRUNE_CACHE") or Path.home() / ".cache" / "vlaprune"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_dir(kind: str, payload: dict[str, Any]) -> Path:
    """A cache directory named after a hash of ``payload``: generated files never go stale."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_dir() / f"{kind}-{digest}"


def generated_dir(kind: str, payload: dict[str, Any], *, marker: str, write: Callable[[Path], None]) -> Path:
    """``content_dir(kind, payload)``, filled by ``write`` on first use.

    ``write`` fills a temporary sibling that is then renamed into place, so a crash never leaves a
    partial directory under the final name and concurrent builders agree on one copy. ``marker`` is
    a file whose presence means the directory is complete.
    """
    final = content_dir(kind, payload)
    if (final / marker).is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
            logger.info("generated %s", final)
        except OSError as err:  # another builder won the race: fine if its copy is complete
            if not (final / marker).is_file():
                raise RuntimeError(f"{final} exists but is incomplete; delete it and retry") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
