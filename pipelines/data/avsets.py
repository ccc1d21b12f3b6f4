"""The thesis' recommended audio-visual sets, read from their published annotation files into the
example contract (:mod:`pipelines.data.example`), one example per clip.

Formats, as their publishers document them:

**VGGSound** (``vggsound.csv``, https://github.com/hche11/VGGSound, README "Dataset"): no header; each
line ``YouTube ID, start seconds, label, train/test split``, comma-separated with CSV quoting (a label
holding a comma is quoted: ``0_8-g2rof7E,49,"heart sounds, heartbeat",test``); the clip is the 10 s
from the start second. The repository's own lists name clips ``{id}_{start:06d}.mp4``
(``data/test.csv``: ``glLQrEijrKg_000300.mp4``). Task: "What is making the sound?" -> the label;
metric ``label`` (:mod:`pipelines.metrics.labels`), the closed set being every label of the file.

**AudioSet** (``eval_segments.csv``, ``balanced_train_segments.csv``, ``unbalanced_train_segments.csv``;
https://research.google.com/audioset/download.html, "CSV file format"): three header lines starting
with ``#`` (the creation time, the counts, and the columns ``# YTID, start_seconds, end_seconds,
positive_labels``), then lines ``-0RWZT-miFs, 420.000, 430.000, "/m/03v3yw,/m/0k4j"``: fields separated
by a comma and a space, the label ids quoted and comma-separated. ``ontology.json``
(https://github.com/audioset/ontology) is a JSON list of classes ``{"id": "/m/09x0r", "name":
"Speech", ...}``: the ids become names. The split is the file's name less ``_segments`` (``eval``,
``balanced_train``, ``unbalanced_train``). Task: "Which sounds are in the clip?" -> the label names
in the ontology's order joined by ``"; "`` (:data:`~pipelines.metrics.labels.LABEL_SEPARATOR`);
metric ``multilabel``, the closed set being the names of every label id the files use, in the
ontology's order.

**VALOR** (VALOR-32K annotations ``desc_train.json``, ``desc_val.json``, ``desc_test.json``;
https://casia-iva-group.github.io/projects/VALOR/download.html, read as the VALOR repository's users
read them): a JSON list of records ``{"video_id": "<YouTube id>_<start>_<end>", "desc": "<an
audio-visual caption>"}``. ``desc`` may also be a list of captions, and a clip may have several
records: each clip's captions are all its references (the first is the training target). The split
is the file's name less ``desc_``. Task: captioning; metric ``caption`` (BLEU-4 and CIDEr-D).

Clips: each annotation names its clip file by a pattern, a path relative to the clips folder with
the fields ``{id}`` (the YouTube id; VALOR: the video_id), ``{start}`` and ``{end}`` (whole seconds)
and ``{start_ms}`` (milliseconds), Python format specs allowed; the defaults are
:data:`DEFAULT_PATTERNS`. The example's vector fields (``audio`` and ``video``, one clip for both)
hold the clip's id as ``embed`` keys it, the file name's stem (``embed CLIPS`` on the folder, or on
``OUT/clips.tsv``, the list of the clips found). Clips named but not in the folder, and, given the
caches (``CACHE.failures.jsonl`` beside each), clips that failed to embed or are not in a cache, are
left out, counted and listed in ``OUT/skipped.jsonl`` (the annotation's file and line, the clip, the
reason); never fatal unless ``strict``.
"""

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from embed.sources import id_from_name

from ..errors import PipelineError
from ..files import write_atomic
from ..metrics.labels import LABEL_SEPARATOR
from .example import (
    DATASET,
    DATASET_FORMAT,
    Example,
    ExampleFormatError,
    write_examples,
)

FORMATS = ("vggsound", "audioset", "valor")
DEFAULT_PATTERNS = {"vggsound": "{id}_{start:06d}.mp4", "audioset": "{id}_{start:06d}.mp4", "valor": "{id}.mp4"}
QUESTIONS = {"vggsound": "What is making the sound?", "audioset": "Which sounds are in the clip?",
             "valor": "What happens in the clip?"}
METRIC = {"vggsound": "label", "audioset": "multilabel", "valor": "caption"}
MODALITIES = ("audio", "video")
SKIPPED = "skipped.jsonl"
CLIP_LIST = "clips.tsv"
TRAIN_SETTINGS = "fuse.json"  # answer lengths for fuse-train --config


class AVSetFormatError(ExampleFormatError):
    """An annotation file does not follow its published format; the message names the file and line."""


@dataclass(frozen=True)
class Annotation:
    """One clip's annotation: ``key`` (the example id), the pattern's fields, the target and the
    references, the split, and where it was read (``FILE:LINE``)."""

    key: str
    fields: dict
    target: str
    references: tuple
    split: str
    where: str


def _seconds(text: str, what: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise AVSetFormatError(f"{where}: {what} {text!r} is not a number of seconds") from None
    if not value >= 0:
        raise AVSetFormatError(f"{where}: {what} {text!r} is negative")
    return value


def _fields(ytid: str, start: float, end: float | None = None) -> dict:
    return {"id": ytid, "start": int(start), "end": int(start + 10 if end is None else end),
            "start_ms": round(start * 1000)}


def _rows(path: Path, **kw):
    """``(line number, fields)`` of each non-blank CSV record of ``path`` that does not start with
    ``#`` (the line number is where the record starts)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, strict=True, **kw)
            start = 1
            try:
                for row in reader:
                    if row and not (len(row) == 1 and not row[0].strip()) and not row[0].lstrip().startswith("#"):
                        yield start, row
                    start = reader.line_num + 1
            except csv.Error as e:
                raise AVSetFormatError(f"{path}:{reader.line_num}: not a CSV line ({e})") from None
    except UnicodeDecodeError as e:
        raise AVSetFormatError(f"{path}: not UTF-8 text ({e})") from None
    except FileNotFoundError:
        raise AVSetFormatError(f"{path}: no such file") from None


def read_vggsound(paths) -> tuple:
    """``(annotations, labels)`` of ``vggsound.csv`` files; labels: every label, sorted."""
    out, labels = [], set()
    for path in map(Path, paths):
        for line, row in _rows(path):
            where = f"{path}:{line}"
            if len(row) != 4:
                hint = " (a label holding a comma is quoted: \"a, b\")" if len(row) > 4 else ""
                raise AVSetFormatError(f"{where}: expected 4 columns (YouTube ID, start seconds, label, split), got "
                                       f"{len(row)}{hint}")
            ytid, start, label, split = (x.strip() for x in row)
            if not ytid:
                raise AVSetFormatError(f"{where}: empty YouTube ID")
            start = _seconds(start, "start seconds", where)
            if not label:
                raise AVSetFormatError(f"{where}: empty label")
            if not split or not split.replace("_", "a").replace("-", "a").isalnum():
                raise AVSetFormatError(f"{where}: split {split!r} is not a word (train, test)")
            fields = _fields(ytid, start)
            out.append(Annotation(f"{ytid}_{fields['start']:06d}", fields, label, (label,), split, where))
            labels.add(label)
    return out, sorted(labels)


def read_ontology(path) -> dict:
    """``{label id: (position, name)}`` of AudioSet's ``ontology.json``."""
    path = Path(path)
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AVSetFormatError(f"{path}: no such file") from None
    except ValueError as e:
        raise AVSetFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(classes, list):
        raise AVSetFormatError(f"{path}: expected the ontology's JSON list of classes, got {type(classes).__name__}")
    out = {}
    for i, c in enumerate(classes):
        if not isinstance(c, dict) or not isinstance(c.get("id"), str) or not isinstance(c.get("name"), str):
            raise AVSetFormatError(f"{path}: class {i} has no string \"id\" and \"name\"")
        if LABEL_SEPARATOR.strip() in c["name"]:
            raise AVSetFormatError(f"{path}: class {c['id']} name {c['name']!r} holds the label separator "
                                   f"{LABEL_SEPARATOR.strip()!r}")
        out[c["id"]] = (i, c["name"].strip())
    return out


def _split_name(path: Path, prefix: str = "", suffix: str = "") -> str:
    stem = path.name.split(".", 1)[0]
    if prefix and stem.startswith(prefix):
        stem = stem[len(prefix):]
    if suffix and stem.endswith(suffix):
        stem = stem[: -len(suffix)]
    return stem.replace(".", "_") or "all"


def read_audioset(paths, ontology) -> tuple:
    """``(annotations, labels)`` of AudioSet segment CSVs; labels: the names of the label ids used,
    in the ontology's order."""
    classes = read_ontology(ontology)
    out, used = [], set()
    for path in map(Path, paths):
        split = _split_name(path, suffix="_segments")
        for line, row in _rows(path, skipinitialspace=True):
            where = f"{path}:{line}"
            if len(row) != 4:
                raise AVSetFormatError(f"{where}: expected 4 columns (YTID, start_seconds, end_seconds, "
                                       f"positive_labels), got {len(row)} (the label ids are quoted: "
                                       '"/m/09x0r,/m/05zppz")')
            ytid = row[0].strip()
            if not ytid:
                raise AVSetFormatError(f"{where}: empty YTID")
            start, end = _seconds(row[1], "start_seconds", where), _seconds(row[2], "end_seconds", where)
            if end <= start:
                raise AVSetFormatError(f"{where}: end_seconds {row[2].strip()} is not after start_seconds "
                                       f"{row[1].strip()}")
            ids = [x.strip() for x in row[3].split(",")]
            if not all(ids):
                raise AVSetFormatError(f"{where}: positive_labels {row[3]!r} has an empty label id")
            unknown = [x for x in ids if x not in classes]
            if unknown:
                raise AVSetFormatError(f"{where}: label id {unknown[0]} is not in {ontology}")
            ordered = sorted(dict.fromkeys(ids), key=lambda x: classes[x][0])
            names = tuple(classes[x][1] for x in ordered)
            used.update(ordered)
            fields = _fields(ytid, start, end)
            out.append(Annotation(f"{ytid}_{fields['start']:06d}", fields, LABEL_SEPARATOR.join(names), names,
                                  split, where))
    return out, [classes[x][1] for x in sorted(used, key=lambda x: classes[x][0])]


def _json_items(path: Path):
    """``(line, item)`` of each element of the JSON list in ``path``, with the line it starts on."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AVSetFormatError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise AVSetFormatError(f"{path}: not UTF-8 text ({e})") from None
    decoder = json.JSONDecoder()

    def skip(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i):
        return text.count("\n", 0, i) + 1

    i = skip(0)
    if i >= len(text) or text[i] != "[":
        raise AVSetFormatError(f"{path}:{line_of(i)}: expected a JSON list of {{\"video_id\", \"desc\"}} records")
    i = skip(i + 1)
    if i < len(text) and text[i] == "]":
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, i)
        except ValueError as e:
            raise AVSetFormatError(f"{path}:{getattr(e, 'lineno', line_of(i))}: not valid JSON "
                                   f"({getattr(e, 'msg', e)})") from None
        yield line_of(i), item
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
        elif i < len(text) and text[i] == "]":
            if skip(i + 1) != len(text):
                raise AVSetFormatError(f"{path}:{line_of(skip(i + 1))}: text after the JSON list")
            return
        else:
            raise AVSetFormatError(f"{path}:{line_of(i)}: expected ',' or ']' in the JSON list")


def read_valor(paths) -> tuple:
    """``(annotations, [])`` of VALOR ``desc_*.json`` files: one annotation per video_id, its captions
    in file order."""
    by_id, order = {}, []
    for path in map(Path, paths):
        split = _split_name(path, prefix="desc_")
        for line, item in _json_items(path):
            where = f"{path}:{line}"
            if not isinstance(item, dict):
                raise AVSetFormatError(f"{where}: expected a {{\"video_id\", \"desc\"}} record, got {type(item).__name__}")
            vid, desc = item.get("video_id"), item.get("desc")
            if not isinstance(vid, str) or not vid.strip():
                raise AVSetFormatError(f"{where}: no \"video_id\" string")
            captions = [desc] if isinstance(desc, str) else desc
            if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip()
                                                                         for c in captions):
                raise AVSetFormatError(f"{where}: \"desc\" is not a caption (a non-empty string, or a list of them)")
            vid = vid.strip()
            if vid in by_id:
                first = by_id[vid]
                if first["split"] != split:
                    raise AVSetFormatError(f"{where}: video_id {vid} is also in split {first['split']} "
                                           f"({first['where']})")
                first["captions"] += [c.strip() for c in captions]
                continue
            by_id[vid] = {"captions": [c.strip() for c in captions], "split": split, "where": where}
            order.append(vid)
    out = []
    for vid in order:
        d = by_id[vid]
        out.append(Annotation(vid, {"id": vid, "start": 0, "end": 0, "start_ms": 0}, d["captions"][0],
                              tuple(d["captions"]), d["split"], d["where"]))
    return out, []


def check_pattern(pattern: str, fmt: str) -> None:
    """Raise ``ValueError`` (naming ``--pattern``) unless ``pattern`` formats a relative file path."""
    try:
        name = pattern.format(**_fields("abcdefghijk", 30.0))
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"--pattern {pattern}: cannot be filled ({type(e).__name__}: {e}); its fields are {{id}}, "
                         "{start}, {end} (whole seconds) and {start_ms}, e.g. " + DEFAULT_PATTERNS[fmt]) from None
    if not name or Path(name).is_absolute() or name.endswith("/"):
        raise ValueError(f"--pattern {pattern}: must name a file under the clips folder, e.g. {DEFAULT_PATTERNS[fmt]}")


def read_failures(cache) -> dict:
    """``{id: reason}`` of the failures report beside a cache (``CACHE.failures.jsonl``), if any."""
    cache = Path(cache)
    path = cache.with_name(cache.name + ".failures.jsonl")
    out = {}
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    d = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if isinstance(d, dict) and "id" in d:
                    out[str(d["id"])] = str(d.get("reason", "failed"))
    return out


def read_annotations(fmt: str, annotations, ontology=None) -> tuple:
    """``(annotations, labels)`` of ``annotations`` in the format ``fmt``."""
    if fmt == "vggsound":
        return read_vggsound(annotations)
    if fmt == "audioset":
        if ontology is None:
            raise ValueError("--ontology: AudioSet's label ids need ontology.json to become names")
        return read_audioset(annotations, ontology)
    if fmt == "valor":
        return read_valor(annotations)
    raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")


def write_avset(fmt: str, annotations, clips, out, pattern: str | None = None, ontology=None, caches=None,
                modalities=MODALITIES, strict: bool = False) -> dict:
    """Read a set's annotation files, find each clip in ``clips`` and write the examples layout to
    ``out``: ``examples-{split}.jsonl``, ``dataset.json`` (the metric and, for labels, the closed
    label set), ``clips.tsv`` (``id<TAB>path`` of the clips found, for ``embed``) and
    ``skipped.jsonl`` (the annotations left out, with why) and ``fuse.json`` (``fuse-train --config``:
    answer lengths that hold the longest target, in UTF-8 bytes + 1, at least 16).

    Args:
        fmt: ``vggsound``, ``audioset`` or ``valor``.
        annotations: the annotation files (see the module docstring).
        clips: the clips folder.
        out: the output folder (a rerun into it replaces what it wrote there).
        pattern: the clip file of an annotation (default :data:`DEFAULT_PATTERNS`).
        ontology: AudioSet's ``ontology.json``.
        caches: vector field -> cache folder: leave out clips that failed to embed there, or that are not
            in it.
        modalities: the vector fields of each example (each keyed by the clip's id).
        strict: raise after writing the report when any annotation was left out.

    Returns:
        ``{"examples": {split: count}, "skipped": {reason kind: count}, "labels": count, "out": str}``.

    Raises:
        AVSetFormatError: an annotation file is malformed (``FILE:LINE: problem``), or two annotations
            name one clip.
        PipelineError: no clip was found, or (``strict``) some annotations were left out.
        ValueError: a bad ``pattern``, ``modalities`` or ``caches`` (exit 2, naming the flag).
    """
    from store import CacheReader

    pattern = pattern or DEFAULT_PATTERNS[fmt]
    check_pattern(pattern, fmt)
    modalities = list(modalities)
    if not modalities or any(m not in MODALITIES for m in modalities) or len(set(modalities)) != len(modalities):
        raise ValueError(f"--modalities {','.join(modalities)}: choose from {', '.join(MODALITIES)}, each once")
    caches = dict(caches or {})
    for name in caches:
        if name not in modalities:
            raise ValueError(f"--cache {name}=CACHE: not one of --modalities {','.join(modalities)}")
    clips, out = Path(clips), Path(out)
    if not clips.is_dir():
        raise PipelineError(f"{clips}: not a folder of clips")
    _refuse_foreign(out, fmt)
    rows, labels = read_annotations(fmt, annotations, ontology)
    if not rows:
        raise AVSetFormatError(f"{', '.join(map(str, annotations))}: no annotation")

    failures = {name: read_failures(path) for name, path in caches.items()}
    keys = {}
    for name, path in caches.items():
        with CacheReader(path) as reader:
            keys[name] = set(reader.keys())
    examples, skipped, listed, by_key, by_clip = {}, [], {}, {}, {}
    for a in rows:
        if a.key in by_key:
            raise AVSetFormatError(f"{a.where}: clip {a.key} is also annotated at {by_key[a.key]}")
        by_key[a.key] = a.where
        path = clips / pattern.format(**a.fields)
        clip_id = id_from_name(path.name)
        if clip_id in by_clip:
            raise AVSetFormatError(f"{a.where}: --pattern {pattern} names {path.name}, the clip of {by_clip[clip_id]} "
                                   "too (give a pattern with {start})")
        by_clip[clip_id] = a.where
        reason = None
        if not path.is_file():
            reason = "missing: no such file"
        else:
            listed[clip_id] = path
            for name in caches:
                if clip_id in failures[name]:
                    reason = f"failed ({name}): {failures[name][clip_id]}"
                    break
                if clip_id not in keys[name]:
                    reason = f"not embedded ({name}): not in {caches[name]}"
                    break
        if reason:
            skipped.append({"id": a.key, "clip": str(path), "annotation": a.where, "reason": reason})
            continue
        examples.setdefault(a.split, []).append(Example(
            id=a.key, texts={"question": QUESTIONS[fmt]}, vectors={m: clip_id for m in modalities},
            target=a.target, references=a.references, split=a.split))

    out.mkdir(parents=True, exist_ok=True)
    _write_lines(out / SKIPPED, (json.dumps(s, ensure_ascii=False) for s in skipped))
    _write_lines(out / CLIP_LIST, (f"{k}\t{p.resolve()}" for k, p in sorted(listed.items())))
    counts = {}
    for s in skipped:
        kind = s["reason"].split(":", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    if not examples:
        example = next(iter(skipped))["clip"]
        raise PipelineError(f"no clip of the {len(rows)} annotations is usable ({', '.join(f'{k} {v}' for k, v in counts.items())}; "
                            f"e.g. {example}); listed in {out / SKIPPED}")
    for old in out.glob("examples-*.jsonl"):
        old.unlink()  # a rerun (e.g. with --cache) replaces the examples
    for split, exs in examples.items():
        write_examples(out, split, exs)
    info = {"format": DATASET_FORMAT, "metric": METRIC[fmt], "reader": fmt,
            "description": f"{fmt} read by `vqa-data {fmt}`: {QUESTIONS[fmt]}",
            "annotations": [str(Path(p).resolve()) for p in annotations], "clips": str(clips.resolve()),
            "pattern": pattern, "modalities": modalities}
    if labels:
        info["labels"] = labels
        if fmt == "audioset":
            info["label_separator"] = LABEL_SEPARATOR
    write_atomic(out / DATASET, json.dumps(info, indent=2) + "\n")
    # fuse-train settings that let the targets through whole: the default answer length (16 tokens) cuts
    # "wind rustling leaves" and every caption with the byte tokenizer (a token per UTF-8 byte, an upper
    # bound for subword tokenizers); `fuse-train --config OUT/fuse.json`
    longest = max(len(r.encode("utf-8")) for exs in examples.values() for e in exs for r in (e.target, *e.references))
    length = max(16, longest + 1)
    write_atomic(out / TRAIN_SETTINGS, json.dumps({"max_answer_len": length, "max_new_tokens": length}) + "\n")
    if strict and skipped:
        raise PipelineError(f"{len(skipped)} of {len(rows)} annotations left out (--strict): "
                            f"{', '.join(f'{k} {v}' for k, v in counts.items())}; listed in {out / SKIPPED}")
    return {"examples": {k: len(v) for k, v in sorted(examples.items())}, "skipped": counts,
            "skipped_total": len(skipped), "annotations": len(rows), "labels": len(labels), "out": str(out)}


def _write_lines(path: Path, lines) -> None:
    text = "".join(line + "\n" for line in lines)
    if text:
        write_atomic(path, text)
    elif path.exists():
        path.unlink()


def _refuse_foreign(out: Path, fmt: str) -> None:
    """Refuse an ``out`` that holds examples not written by this reader (a rerun replaces its own)."""
    info = out / DATASET
    if not any(out.glob("examples-*.jsonl")):
        return
    try:
        reader = json.loads(info.read_text()).get("reader")
    except (OSError, ValueError, AttributeError):
        reader = None
    if reader != fmt:
        raise PipelineError(f"{out} holds examples not written by `vqa-data {fmt}`: write to another folder or "
                            "delete it first")
