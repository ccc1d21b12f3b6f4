"""Seeded train/eval splits of QA records and examples.

``by="image"`` (default) puts every question of an image on the same side, so no image is seen in
both training and evaluation (for an :class:`~pipelines.data.example.Example`: its ``image`` vector
field, else its first one); ``by="question"`` is the thesis' random slice of questions (of examples). The split
depends only on the seed and the set of ids, not on the order of the records; each side keeps the
records' order.
"""

import random

from .example import Example, example_unit

SPLIT_BY = ("image", "question")


def _unit(record, by: str) -> str:
    if isinstance(record, Example) or (isinstance(record, dict) and "vectors" in record):
        return example_unit(record, by)
    name = "image_id" if by == "image" else "question_id"
    return str(record[name] if isinstance(record, dict) else getattr(record, name))


def split_records(records, by: str = "image", eval_fraction: float = 0.2, seed: int = 0,
                  flag: str = "--eval-fraction"):
    """Split records into ``(train, eval)``.

    Args:
        records: :class:`~pipelines.data.example.Example` s or their dicts, or
            :class:`~pipelines.data.vqa.QARecord` s or dicts with ``image_id`` and ``question_id``.
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
    keys = [_unit(r, by) for r in records]
    units = sorted(set(keys))
    if len(units) < 2:
        raise ValueError(f"{flag} {eval_fraction} --split-by {by}: {len(units)} distinct {by}(s), "
                         "need at least 2 to split")
    random.Random(seed).shuffle(units)
    n_eval = min(max(round(len(units) * eval_fraction), 1), len(units) - 1)
    eval_units = set(units[:n_eval])
    train = [r for r, k in zip(records, keys) if k not in eval_units]
    evals = [r for r, k in zip(records, keys) if k in eval_units]
    return train, evals
