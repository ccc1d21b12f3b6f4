"""The pre-flight check: before training or eval, is every id of the QA records in its cache?"""

import logging
from dataclasses import dataclass

from store.walk import check_index

from ..errors import MissingEmbeddingsError
from .batch import missing_field

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5


@dataclass
class PreflightReport:
    """What :func:`preflight` found.

    Attributes:
        records: records checked.
        kept: the records whose ids every cache holds, in order.
        missing: modality -> ``{"records": n affected, "ids": [distinct missing ids, in record order]}``.
    """

    records: int
    kept: list
    missing: dict

    @property
    def dropped(self) -> int:
        return self.records - len(self.kept)


def preflight(records, readers: dict, allow_missing: bool = False) -> PreflightReport:
    """Count the records whose ids a cache lacks; fail (default) or drop them.

    Args:
        records: example dicts (:mod:`pipelines.data.example`): each vector field's id in ``vectors``.
        readers: vector field -> :class:`store.CacheReader` (metadata already checked).
        allow_missing: drop those records (logged as a warning) instead of failing.

    Each cache's index is walked first, in a child process (:func:`store.walk.check_index`): a
    damaged page is a :class:`store.CacheDamagedError` naming the cache, not a crash of this
    process nor ids reported missing. The values are checked (CRC-32) as the stream first reads them.

    Raises:
        CacheDamagedError: a cache's index is damaged.
        MissingEmbeddingsError: ids are missing and ``allow_missing`` is false; the message gives,
            per modality, how many ids and records, and up to 5 example ids.
    """
    for reader in readers.values():  # damaged index pages: an error naming the cache, not a crash
        check_index(reader.path)
    records = list(records)
    bad = set()  # indices of records to drop
    missing, lines = {}, []
    for name, reader in readers.items():
        present, ids, affected = {}, [], 0
        for i, rec in enumerate(records):
            if name not in rec["vectors"]:
                raise missing_field(rec, "vectors", name)
            key = str(rec["vectors"][name])
            ok = present.get(key)
            if ok is None:
                ok = present[key] = key in reader
                if not ok:
                    ids.append(key)
            if not ok:
                affected += 1
                bad.add(i)
        if ids:
            missing[name] = {"records": affected, "ids": ids}
            examples = ", ".join(ids[:MAX_EXAMPLES]) + (", ..." if len(ids) > MAX_EXAMPLES else "")
            lines.append(f"cache {name} ({reader.path}) lacks {len(ids)} of {len(present)} ids, "
                         f"needed by {affected} of {len(records)} records (e.g. {examples})")
    if lines and not allow_missing:
        first = next(iter(missing))
        raise MissingEmbeddingsError("; ".join(lines) + ": embed them, or allow missing ids "
                                     "(--allow-missing) to drop those records",
                                     first, missing[first]["ids"], missing[first]["records"])
    for line in lines:
        log.warning("%s: dropping those records (--allow-missing)", line)
    kept = [r for i, r in enumerate(records) if i not in bad] if bad else records
    return PreflightReport(records=len(records), kept=kept, missing=missing)
