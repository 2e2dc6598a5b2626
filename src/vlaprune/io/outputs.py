"""Output directories that are never half-written: refuse existing ones unless asked, write to a
temporary sibling, move into place."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing output directory unless ``overwrite`` (checked before any work is done)."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} exists; pass --overwrite to replace it")


def write_atomically(out: Path, overwrite: bool, write: Callable[[Path], object]) -> None:
    """Let ``write`` fill a temporary sibling directory, then move it into place.

    A failure leaves nothing at ``out`` (or the previous results, untouched, when overwriting).
    """
    prepare_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
