"""Seeded train/eval splits of QA records.

``by="image"`` (default) puts every question of an image on the same side, so no image is seen in
both training and evaluation; ``by="question"`` is the thesis' random slice of questions. The split
depends only on the seed and the set of ids, not on the order of the records; each side keeps the
records' order.
"""

import random

SPLIT_BY = ("image", "question")


def _field(record, name):
    return record[name] if isinstance(record, dict) else getattr(record, name)


def split_records(records, by: str = "image", eval_fraction: float = 0.2, seed: int = 0,
                  flag: str = "--eval-fraction"):
    """Split records into ``(train, eval)``.

    Args:
        records: :class:`~pipelines.data.vqa.QARecord` s or dicts with ``image_id`` and ``question_id``.
        by: ``image`` or ``question``.
        eval_fraction: share of the images (or questions) that go to eval, rounded to a whole number,
            at least one on each side.
        seed: the split's seed.
        flag: the option that set ``eval_fraction``, for messages (``--select-fraction`` for the
            selection slice of a train side).

    Raises:
        ValueError: bad arguments, or too few images/questions for two non-empty sides.
    """
    if by not in SPLIT_BY:
        raise ValueError(f"--split-by {by}: choose one of {', '.join(SPLIT_BY)}")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"{flag} {eval_fraction}: must be between 0 and 1")
    records = list(records)
    key = "image_id" if by == "image" else "question_id"
    units = sorted({str(_field(r, key)) for r in records})
    if len(units) < 2:
        raise ValueError(f"{flag} {eval_fraction} --split-by {by}: {len(units)} distinct {by}(s), "
                         "need at least 2 to split")
    random.Random(seed).shuffle(units)
    n_eval = min(max(round(len(units) * eval_fraction), 1), len(units) - 1)
    eval_units = set(units[:n_eval])
    train = [r for r in records if str(_field(r, key)) not in eval_units]
    evals = [r for r in records if str(_field(r, key)) in eval_units]
    return train, evals
