"""The example contract: what every dataset becomes, what the shards carry and what a run trains on.

An example is one input-output pair of a task:

=============== ================= ==================================================================
field           JSON type         what
=============== ================= ==================================================================
``id``          int or str        unique in its dataset (VQA: the question id); results files and
                                  predictions are keyed by it
``texts``       {name: str}       named text fields (``question``, ``title``, ``description``), each
                                  tokenized by the run's tokenizer when ``--fuse`` names it
``vectors``     {name: str}       named vector fields, each the key of this example's entry in that
                                  field's cache (``image: "9"``, ``audio: "yt_abc_000030"``): every
                                  vector field is looked up by its own id
``target``      str               what the decoder learns to write (VQA: the most frequent of the 10
                                  answers); empty for an example without annotations (a test split)
``references``  [str]             what the metric scores a prediction against (VQA: the 10 human
                                  answers; a label; several captions); empty: answered, not scored
``groups``      {name: str}       what the score is broken down by (VQA: ``answer_type``,
                                  ``question_type``); may be empty
``split``       str               the source split (VQA: ``train``, ``val``; names the image folder)
=============== ================= ==================================================================

The shards carry examples as JSON (:mod:`pipelines.data.shards`; never pickle), and their manifest
states the fields (``{"texts": [...], "vectors": [...]}``) and the metric, so that ``fuse-train``
refuses a ``--fuse`` that names a field the data lacks before any step.

Metrics (:data:`METRICS`): ``vqa``, the official VQA accuracy over 10 human answers; ``exact``, exact
match of the normalised prediction with any reference (single labels); ``caption``, BLEU-4 and
CIDEr-D against the reference captions (:mod:`pipelines.metrics.captions`); ``label`` and
``multilabel``, a closed label set (one label, or a set of labels joined by ``; ``): exact match,
top-1, exact-set match, micro/macro F1 and mAP, from the generated text and from the model's
likelihood of each label (:mod:`pipelines.metrics.labels`); their ``dataset.json`` lists the labels
(``"labels": [...]``), and the shards' manifest carries the list.

Two readers make examples: the VQA v2 layout (:mod:`pipelines.data.vqa`: ``question`` text, ``image``
vector), and the examples layout below, for any other task (:mod:`pipelines.data.avsets` writes it
from VGGSound's, AudioSet's and VALOR's published annotations)::

    DIR/examples-{split}.jsonl    one example per line, as above
    DIR/dataset.json              {"format": "where-to-fuse/examples", "metric": "exact", ...}
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VQAFormatError
from ..files import read_format_json, write_atomic

METRICS = ("vqa", "exact", "caption", "label", "multilabel")
CLOSED_SET_METRICS = ("label", "multilabel")  # their dataset.json lists the closed label set ("labels")
DATASET = "dataset.json"
DATASET_FORMAT = "where-to-fuse/examples"
_EXAMPLES_RE = re.compile(r"^examples-([\w-]+)\.jsonl$")
DEFAULT_TEXT_LEN = 128  # tokens of a text field unless a run says otherwise (--text-len)
MAX_TEXT_CHARS = 100_000  # a longer text is a broken file (fields are cut to the token limit anyway)


class ExampleFormatError(VQAFormatError):
    """An example (or an examples file) does not follow the contract; the message says where."""


def _is_name(name) -> bool:
    return isinstance(name, str) and name != "" and name.replace("_", "a").replace("-", "a").isalnum()


@dataclass(frozen=True)
class Example:
    """One example of the contract (see the module docstring)."""

    id: int | str
    texts: dict = field(default_factory=dict)
    vectors: dict = field(default_factory=dict)
    target: str = ""
    references: tuple = ()
    groups: dict = field(default_factory=dict)
    split: str = ""

    def to_dict(self) -> dict:
        return {"id": self.id, "texts": dict(self.texts), "vectors": dict(self.vectors), "target": self.target,
                "references": list(self.references), "groups": dict(self.groups), "split": self.split}

    @classmethod
    def from_dict(cls, d, where: str = "example") -> "Example":
        """An example from its JSON form, checked (:func:`check_example`)."""
        check_example(d, where)
        return cls(id=d["id"], texts=dict(d["texts"]), vectors={k: str(v) for k, v in d["vectors"].items()},
                   target=d.get("target", ""), references=tuple(d.get("references", ())),
                   groups=dict(d.get("groups", {})), split=d.get("split", ""))

    def unit(self, by: str) -> str:
        """What a split keeps on one side (:func:`pipelines.data.splits.split_records`): the example
        itself (``question``, ``example``), or the id of a vector field (``image``: the ``image``
        field, else the first vector field), so that no image is seen on both sides."""
        return example_unit(self, by)


def _get(e, name: str):
    """A field of an :class:`Example` or of its JSON form."""
    return getattr(e, name) if isinstance(e, Example) else e.get(name)


def example_unit(e, by: str) -> str:
    """:meth:`Example.unit` of an example or its JSON form."""
    vectors = _get(e, "vectors") or {}
    if by in ("question", "example") or not vectors:
        return str(_get(e, "id"))
    return str(vectors[by] if by in vectors else next(iter(vectors.values())))


def group_key(e) -> str:
    """The id that packs examples (or their JSON forms) into one shard sample: the first vector
    field's id (an image's questions are read together), else the example's own."""
    vectors = _get(e, "vectors") or {}
    return str(next(iter(vectors.values()))) if vectors else f"#{_get(e, 'id')}"


def check_example(d, where: str = "example") -> None:
    """Raise :class:`ExampleFormatError` (naming ``where`` and the field) unless ``d`` is an example's
    JSON form: ``id`` an int or str, ``texts`` and ``vectors`` objects of names to strings, ``target`` a
    string, ``references`` a list of strings, ``groups`` an object of strings."""
    if not isinstance(d, dict):
        raise ExampleFormatError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if "id" not in d:
        raise ExampleFormatError(f"{where}: no id")
    if isinstance(d["id"], bool) or not isinstance(d["id"], (int, str)):
        raise ExampleFormatError(f"{where}: id {d['id']!r} is not an integer or a string")
    where = f"{where} (id {d['id']})"
    for key in ("texts", "vectors", "groups"):
        value = d.get(key, {})
        if not isinstance(value, dict):
            raise ExampleFormatError(f"{where}: {key} is not an object of names to strings")
        for name, v in value.items():
            if not _is_name(name):
                raise ExampleFormatError(f"{where}: {key}: {name!r} is not a field name (a word: letters, "
                                         "digits, _ and -)")
            if key == "vectors" and isinstance(v, int) and not isinstance(v, bool):
                continue  # an integer id (COCO's) is its decimal string
            if not isinstance(v, str):
                raise ExampleFormatError(f"{where}: {key}.{name} is {type(v).__name__}, not a string")
            if key == "texts" and len(v) > MAX_TEXT_CHARS:
                raise ExampleFormatError(f"{where}: texts.{name} has {len(v):,} characters, more than "
                                         f"{MAX_TEXT_CHARS:,}")
    if not d.get("texts") and not d.get("vectors"):
        raise ExampleFormatError(f"{where}: no text and no vector field: nothing to encode")
    both = set(d.get("texts", {})) & set(d.get("vectors", {}))
    if both:
        raise ExampleFormatError(f"{where}: {', '.join(sorted(both))} is both a text and a vector field")
    if not isinstance(d.get("target", ""), str):
        raise ExampleFormatError(f"{where}: target is not a string")
    refs = d.get("references", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise ExampleFormatError(f"{where}: references is not a list of strings")
    if not isinstance(d.get("split", ""), str):
        raise ExampleFormatError(f"{where}: split is not a string")


def fields_of(examples) -> dict:
    """``{"texts": [...], "vectors": [...]}``: the fields the examples hold, each in the order first
    seen, and each held by every example (a field only some examples have is refused: a model
    trained on it would see it missing at random)."""
    texts, vectors, counts, n = {}, {}, {}, 0
    for e in examples:
        n += 1
        for kind, out in (("texts", texts), ("vectors", vectors)):
            for name in _get(e, kind):
                out.setdefault(name, None)
                counts[(kind, name)] = counts.get((kind, name), 0) + 1
    partial = [f"{kind[:-1]} field {name!r} ({c} of {n})" for (kind, name), c in counts.items() if c != n]
    if partial:
        raise ExampleFormatError(f"not every example has {', '.join(partial)}: give every example the same fields")
    return {"texts": list(texts), "vectors": list(vectors)}


# ---- the examples layout ---------------------------------------------------------------------------

def is_examples_dir(root) -> bool:
    root = Path(root)
    return (root / DATASET).is_file() or any(_EXAMPLES_RE.match(p.name) for p in root.glob("examples-*.jsonl"))


def examples_path(root, split: str) -> Path:
    return Path(root) / f"examples-{split}.jsonl"


def example_splits(root) -> list:
    """The splits of an examples folder (its ``examples-{split}.jsonl`` files), sorted."""
    splits = sorted(m.group(1) for m in (_EXAMPLES_RE.match(p.name) for p in Path(root).glob("examples-*.jsonl")) if m)
    if not splits:
        raise ExampleFormatError(f"{root}: no examples-<split>.jsonl file")
    return splits


def read_dataset_info(root) -> dict:
    """``dataset.json`` of an examples folder (``{"metric": "exact"}`` when there is none)."""
    path = Path(root) / DATASET
    if not path.is_file():
        return {"format": DATASET_FORMAT, "metric": "exact"}
    info = read_format_json(path, DATASET_FORMAT, f'description ("format": "{DATASET_FORMAT}")', ExampleFormatError)
    info.setdefault("metric", "exact")
    if info["metric"] not in METRICS:
        raise ExampleFormatError(f"{path}: metric {info['metric']!r}: choose one of {', '.join(METRICS)}")
    if info["metric"] in CLOSED_SET_METRICS:
        labels = info.get("labels")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
            raise ExampleFormatError(f"{path}: metric {info['metric']} needs \"labels\": the closed label set, a "
                                     "list of non-empty strings")
    return info


def read_examples(root, splits=None) -> list:
    """Every example of the splits of an examples folder (default: all), checked, in file order.

    Raises:
        ExampleFormatError: a file is missing or malformed (``FILE:LINE: problem``), or an id repeats.
    """
    splits = example_splits(root) if splits is None else list(splits)
    out, seen = [], {}
    for split in splits:
        path = examples_path(root, split)
        if not path.is_file():
            raise ExampleFormatError(f"{path}: no such file (splits here: {', '.join(example_splits(root))})")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except ValueError as e:
                    raise ExampleFormatError(f"{path}:{n}: not valid JSON ({e})") from None
                ex = Example.from_dict(d, f"{path}:{n}")
                if ex.id in seen:
                    raise ExampleFormatError(f"{path}:{n}: id {ex.id!r} also used at {seen[ex.id]}")
                seen[ex.id] = f"{path.name}:{n}"
                out.append(Example(ex.id, ex.texts, ex.vectors, ex.target, ex.references, ex.groups,
                                   ex.split or split))
    if not out:
        raise ExampleFormatError(f"{root}: no examples in {', '.join(examples_path(root, s).name for s in splits)}")
    return out


def write_examples(root, split: str, examples) -> Path:
    """Write ``examples-{split}.jsonl`` (through a temporary name)."""
    path = examples_path(root, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(e.to_dict() if isinstance(e, Example) else e) + "\n" for e in examples))
    return path
