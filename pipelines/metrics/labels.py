"""Metrics of a closed label set: single labels (VGGSound) and label sets (AudioSet).

Both score the generated text and, from the model's likelihoods of the candidate labels
(:mod:`pipelines.train.ranking`), what a classifier's head would give:

``label`` (one label per example, :class:`LabelScore`)
    ``top1``: the candidate label with the highest log-likelihood (the teacher-forced sum of its
    tokens' log-probabilities, end token included) is a reference label, so a near-miss spelling of
    the right label is not a miss; ``exact_match``: the generated text, normalised as VQA answers are
    (:func:`~pipelines.metrics.vqa.normalize_answer`), equals a reference. ``accuracy`` is ``top1``.

``multilabel`` (a set of labels per example, :class:`MultiLabelScore`)
    The target text is the example's label names joined by :data:`LABEL_SEPARATOR` (in a fixed
    order: the ontology's); the generated text is split at ``;`` into a predicted set.
    ``exact_match``: the predicted set equals the reference set; ``micro_f1``: F1 of the true
    positives, false positives and false negatives summed over examples and labels; ``macro_f1``: the
    mean over labels of each label's F1, over the labels that are a reference or a prediction of
    some scored example (a name outside the closed set counts as a label of its own);
    ``map``: the mean over labels with at least one positive of the average precision of ranking
    the examples by that label's score, the log-likelihood of the one-label target (the label
    name alone, then the end token) given the example's inputs. Average precision is
    scikit-learn's ``average_precision_score`` (no interpolation: the sum over distinct score
    thresholds of the recall gained times the precision there; tied scores form one threshold).
    ``accuracy`` is ``map``.

Names are compared after :func:`~pipelines.metrics.vqa.normalize_answer` (lower case, punctuation
dropped), so ``"Male speech, man speaking"`` matches ``"male speech man speaking"``.
"""

import numpy as np

from .vqa import VQAScore, group_key, label_match, normalize_answer, summarise_groups

LABEL_SEPARATOR = "; "  # joins a label set into one target text (the reader refuses an ontology name holding ";")
RANKED_METRICS = ("label", "multilabel")  # the metrics that need the candidates' likelihoods


def split_labels(text: str) -> list:
    """The label names of a generated (or target) text: split at ``;``, normalised, empties dropped,
    each once, in order."""
    out = []
    for part in text.split(LABEL_SEPARATOR.strip()):
        name = normalize_answer(part)
        if name and name not in out:
            out.append(name)
    return out


def average_precision(scores, positives) -> float:
    """Average precision of ranking items by ``scores`` (higher first) against boolean ``positives``,
    as scikit-learn's ``average_precision_score``: ``sum_n (R_n - R_{n-1}) P_n`` over the distinct
    score thresholds. ``nan`` when there is no positive."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if not positives.any():
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positives[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last item of each run of tied scores
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores, truth) -> float:
    """The mean of :func:`average_precision` over the columns (labels) of ``scores`` (N, C) that have
    a positive in ``truth`` (N, C); 0 when none has."""
    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=bool)
    aps = [average_precision(scores[:, c], truth[:, c]) for c in range(truth.shape[1]) if truth[:, c].any()]
    return float(np.mean(aps)) if aps else 0.0


def f1_scores(predicted, gold) -> dict:
    """``{"micro_f1", "macro_f1", "exact_set"}`` of predicted against gold label sets (lists of names)."""
    tp, fp, fn, exact = {}, {}, {}, 0
    for p, g in zip(predicted, gold, strict=True):
        p, g = set(p), set(g)
        exact += p == g
        for name in p | g:
            tp[name] = tp.get(name, 0) + (name in p and name in g)
            fp[name] = fp.get(name, 0) + (name in p and name not in g)
            fn[name] = fn.get(name, 0) + (name in g and name not in p)

    def f1(t, f_p, f_n):
        return 2 * t / (2 * t + f_p + f_n) if t + f_p + f_n else 0.0

    micro = f1(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    macro = float(np.mean([f1(tp[n], fp[n], fn[n]) for n in tp])) if tp else 0.0
    return {"micro_f1": micro, "macro_f1": macro, "exact_set": exact / len(gold) if gold else 0.0}


def _labels(labels) -> list:
    labels = [str(x) for x in labels or ()]
    if not labels:
        raise ValueError("a closed-label metric needs the label set (the shards' manifest lists it as 'labels')")
    return labels


class LabelScore(VQAScore):
    """The ``label`` metric (see the module docstring): :class:`~pipelines.metrics.vqa.VQAScore`'s
    sums and groups, with ``accuracy`` the top-1 of the candidates' likelihoods.

    Args:
        labels: the closed label set, in the order of the ``scores`` given to :meth:`add`.
    """

    needs_scores = True

    def __init__(self, labels):
        super().__init__("exact")
        self.metric = "label"
        self.labels = _labels(labels)

    def add(self, pred: str, answers, answer_type: str = "all", question_type: str = "",
            groups: dict | None = None, scores=None) -> float:
        """Score one prediction; ``scores``: the log-likelihood of each label (default: top-1 is the
        generated text). Returns its top-1 (1.0 or 0.0)."""
        top = self.labels[int(np.argmax(scores))] if scores is not None else pred
        acc = label_match(top, answers)
        t = self.totals.setdefault(group_key(answer_type, question_type, groups), [0, 0.0, 0.0])
        t[0] += 1
        t[1] += acc
        t[2] += label_match(pred, answers)
        return acc

    def summary(self) -> dict:
        out = super().summary()
        out["top1"] = out["accuracy"]
        return out


class MultiLabelScore:
    """The ``multilabel`` metric (see the module docstring). Keeps every item (the mAP ranks examples),
    with the interface of :class:`~pipelines.metrics.vqa.VQAScore` (``add``, ``state``, ``merge``,
    ``summary``).

    Args:
        labels: the closed label set, in the order of the ``scores`` given to :meth:`add`.
    """

    metric = "multilabel"
    needs_scores = True

    def __init__(self, labels):
        self.labels = _labels(labels)
        self.items = []  # [prediction, references, scores (list) or None, group key]

    def add(self, pred: str, references, answer_type: str = "all", question_type: str = "",
            groups: dict | None = None, scores=None) -> None:
        scores = None if scores is None else [float(x) for x in np.asarray(scores).ravel()]
        if scores is not None and len(scores) != len(self.labels):
            raise ValueError(f"{len(scores)} scores for {len(self.labels)} labels")
        self.items.append([pred, list(references), scores, group_key(answer_type, question_type, groups)])

    def state(self) -> dict:
        return {"items": [list(item) for item in self.items]}

    def merge(self, other) -> "MultiLabelScore":
        state = other.state() if isinstance(other, MultiLabelScore) else other
        self.items.extend(list(item) for item in state["items"])
        return self

    def __len__(self) -> int:
        return len(self.items)

    def _one(self, items) -> dict:
        if not items:
            return {"accuracy": 0.0, "map": 0.0, "micro_f1": 0.0, "macro_f1": 0.0, "exact_match": 0.0, "count": 0}
        gold = [list(dict.fromkeys(normalize_answer(r) for r in item[1])) for item in items]
        f1 = f1_scores([split_labels(item[0]) for item in items], gold)
        mean_ap = 0.0
        if all(item[2] is not None for item in items):
            index = {normalize_answer(name): c for c, name in enumerate(self.labels)}
            truth = np.zeros((len(items), len(self.labels)), dtype=bool)
            for i, names in enumerate(gold):
                for name in names:
                    if name in index:
                        truth[i, index[name]] = True
            mean_ap = mean_average_precision(np.array([item[2] for item in items]), truth)
        return {"accuracy": mean_ap, "map": mean_ap, "micro_f1": f1["micro_f1"], "macro_f1": f1["macro_f1"],
                "exact_match": f1["exact_set"], "count": len(items)}

    def summary(self) -> dict:
        """``{"metric": "multilabel", "accuracy" (mAP), "map", "micro_f1", "macro_f1", "exact_match"
        (exact set), "count", "by_answer_type", "by_question_type", "by_group"}``."""
        return {"metric": self.metric, **self._one(self.items),
                **summarise_groups(((item[3], item) for item in self.items), self._one)}


def describe(summary: dict) -> str:
    """The closed-label figures of a summary in one phrase (empty for other metrics)."""
    if summary.get("metric") == "label":
        return f"top-1 {100 * summary['top1']:.2f}%"
    if summary.get("metric") == "multilabel":
        return (f"mAP {100 * summary['map']:.2f}%, micro F1 {100 * summary['micro_f1']:.2f}%, macro F1 "
                f"{100 * summary['macro_f1']:.2f}%, exact set {100 * summary['exact_match']:.2f}%")
    return ""

