"""Writing files so that a killed process leaves the old version or the new one, never half of one;
reading the JSON descriptions the pipelines write."""

import json
import os
import shutil
from pathlib import Path


def write_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` in the place of ``final`` (which may not exist yet).

    ``final`` is first renamed to ``final.old``: a process killed between the two renames leaves
    ``final.old`` whole (see :func:`existing_dir`).
    """
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def existing_dir(final: Path) -> Path:
    """``final``, or the ``final.old`` that :func:`replace_dir` left if it was killed between renames."""
    old = final.with_name(final.name + ".old")
    return old if not final.exists() and old.exists() else final


def read_format_json(path, fmt: str, what: str, error: type, raw: bytes | None = None) -> dict:
    """The JSON object in ``path`` whose ``"format"`` is ``fmt`` (a manifest, a dataset description).

    Args:
        raw: the file's bytes, read by the caller (a URL); default: read ``path``.

    Raises:
        error: ``path`` is not valid JSON, or not an object of that format (``not a FMT WHAT``).
    """
    try:
        data = json.loads(Path(path).read_text() if raw is None else raw)
    except ValueError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise error(f"{path}: not a {fmt} {what}")
    return data
