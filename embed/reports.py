"""The run's reports beside the cache, as JSON lines: failures (``CACHE.failures.jsonl``: id, path,
reason; replaced by each run, since failed sources are retried) and flags (``CACHE.flags.jsonl``:
sources embedded with a remark, ``{"id", "path", "outcome": "embedded", "flags": [...]}`` plus
``"ids"`` when ``--windows`` stored several values; kept across resumed runs for the sources they
did not redo). A flag is ``kind: detail``; the summary counts sources per kind.
"""

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("embed.run")


def write_failures(path: Path, failures: list) -> None:
    """Write this run's failures as JSON lines (replacing an earlier run's report), or remove a stale one."""
    if not failures:
        if path.exists():
            path.unlink()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for item in sorted(failures, key=lambda d: d["id"]):
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    log.warning("%d item(s) failed; listed in %s", len(failures), path)


def write_flags(path: Path, flags: list, redone: list) -> list:
    """Write the flags report: this run's flags plus an earlier run's for the sources this run did not
    redo (they are still in the cache, flagged); returns every entry written."""
    redone = set(redone)
    kept = []
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut by a kill: its source is flagged again when redone
                    continue
                if isinstance(entry, dict) and entry.get("id") not in redone:
                    kept.append(entry)
    entries = sorted(kept + flags, key=lambda d: str(d.get("id")))
    if not entries:
        if path.exists():
            path.unlink()
        return []
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for item in entries:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    if flags:
        log.warning("%d item(s) embedded with flags (%s); listed in %s", len(flags),
                    ", ".join(f"{k} {v}" for k, v in flag_counts(flags).items()), path)
    return entries


def flag_counts(flags: list) -> dict:
    """``{kind: sources}`` where kind is a flag's text before its colon (``padded``, ``cropped``, ...)."""
    counts = {}
    for entry in flags:
        for kind in {str(f).split(":", 1)[0] for f in entry.get("flags", [])}:
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))
