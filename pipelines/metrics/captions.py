"""Caption metrics: BLEU-4 and CIDEr-D as the COCO caption evaluation computes them.

The scores come from ``pycocoevalcap`` (the code of the COCO caption evaluation server, which MSR-VTT
and VALOR figures are computed with too), not from a re-implementation: captions and predictions are
lower-cased and split by its PTB tokenizer (Stanford CoreNLP's ``PTBTokenizer``, which it runs with
``java``), then ``Bleu(4)`` and ``Cider`` (CIDEr-D: clipped, length-penalised, idf over the scored
set) score them. Both are corpus-level, so :class:`CaptionScore` keeps every prediction and scores at
:meth:`~CaptionScore.summary`; groups (``answer_type``, ``question_type``, any other) are each scored as a corpus
of their own. Install with ``pip install 'where-to-fuse[captions]'`` (and a Java runtime).

``accuracy`` in the summary is CIDEr-D (the figure a run selects its checkpoint on); papers report it
times 100.
"""

import shutil

from ..errors import PipelineError
from .vqa import group_key, label_match, summarise_groups


def _scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise PipelineError("the caption metric needs pycocoevalcap: pip install 'where-to-fuse[captions]'") from None
    if shutil.which("java") is None:
        raise PipelineError("the caption metric tokenizes with the COCO evaluation's PTB tokenizer, which runs with "
                            "java: install a Java runtime (e.g. apt install default-jre-headless)")
    return PTBTokenizer, Bleu, Cider


def caption_scores(predictions, references) -> dict:
    """``{"bleu4", "cider"}`` of ``predictions`` (str each) against ``references`` (a list of str each)."""
    if not predictions:
        return {"bleu4": 0.0, "cider": 0.0}
    PTBTokenizer, Bleu, Cider = _scorers()
    both = {f"p{i}": [{"caption": p}] for i, p in enumerate(predictions)}
    both.update({f"r{i}": [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    tokens = PTBTokenizer().tokenize(both)  # one java run for all
    res = {str(i): tokens[f"p{i}"] for i in range(len(predictions))}
    gts = {str(i): tokens[f"r{i}"] for i in range(len(predictions))}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


class CaptionScore:
    """Collects predictions with their reference captions, and scores them at :meth:`summary`: BLEU-4
    and CIDEr-D, overall and by group. The interface of :class:`pipelines.metrics.vqa.VQAScore`
    (``add``, ``state``, ``merge``, ``summary``), so an evaluation takes either.
    """

    metric = "caption"

    def __init__(self):
        _scorers()  # fail before any decoding, not after
        self.items = []  # [prediction, references, group key (pipelines.metrics.vqa.group_key)]

    def add(self, pred: str, references, answer_type: str = "all", question_type: str = "",
            groups: dict | None = None) -> None:
        self.items.append([pred, list(references), group_key(answer_type, question_type, groups)])

    def state(self) -> dict:
        return {"items": [list(item) for item in self.items]}

    def merge(self, other) -> "CaptionScore":
        state = other.state() if isinstance(other, CaptionScore) else other
        self.items.extend(list(item) for item in state["items"])
        return self

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> dict:
        """``{"metric": "caption", "accuracy" (CIDEr-D), "cider", "bleu4", "exact_match", "count",
        "by_answer_type", "by_question_type", "by_group"}``."""
        def one(items):
            scores = caption_scores([i[0] for i in items], [i[1] for i in items])
            exact = sum(label_match(i[0], i[1]) for i in items) / len(items) if items else 0.0
            return {"accuracy": scores["cider"], **scores, "exact_match": exact, "count": len(items)}

        return {"metric": self.metric, **one(self.items),
                **summarise_groups(((item[2], item) for item in self.items), one)}
