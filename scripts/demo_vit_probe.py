"""Linear probes on the demo ViT's frozen tokens, per layout of :mod:`demo_vit_data`.

The features are what ``embed`` stores: the 9 final-norm patch tokens (class token dropped), in
float32. Each probe is a logistic regression (full-batch L-BFGS, L2 0.001, on features standardised
with the fit set's mean and std), fitted on one set of scenes of a variant and scored on other,
held-out scenes of the same variant:

========= =========================== ============================================================
probe     features                    target and score
========= =========================== ============================================================
colour    each patch token            the colour of the object centred in that patch's cell, or
                                      empty (one probe shared by the 9 patches); scored over objects
shape     each patch token            the same for the shape
count     mean of the 9 patch tokens  the number of objects (0..9); scored over scenes
position  mean of the 9 patch tokens  for each of the 9 cells, whether an object is centred in it (9
                                      binary probes); scored over cells
========= =========================== ============================================================

Chance is the majority answer of the fit set, scored the same way. Where every scene has one object
(the ``big`` layout) there is nothing to count, and the count probe is left out (``—``).
"""

import torch
from torch.nn import functional as F

PROBES = ("colour", "shape", "count", "position")


@torch.inference_mode()
def features(model, normalize, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """uint8 pixels ``(N, 3, H, W)`` -> patch tokens ``(N, 9, D)`` float32."""
    model.eval()
    out = [model.forward_features(normalize(x[i:i + batch]))[:, model.num_prefix_tokens:]  # (B, 9, D)
           for i in range(0, len(x), batch)]
    return torch.cat(out).float()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int | None, l2: float = 1e-3, steps: int = 200):
    """A linear classifier ``x (N, D) -> y (N,)``: softmax over ``classes``, or independent sigmoids for
    a 0/1 ``y (N, K)`` when ``classes`` is None. Returns a function of new ``x`` giving predictions."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    out = classes if classes is not None else y.shape[1]
    w = torch.zeros(x.shape[1], out, requires_grad=True)
    b = torch.zeros(out, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = z @ w + b
        loss = (F.cross_entropy(logits, y) if classes is not None
                else F.binary_cross_entropy_with_logits(logits, y.float()))
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()

    def predict(x_new):
        logits = ((x_new - mean) / std) @ w + b
        return logits.argmax(-1) if classes is not None else (logits > 0).long()
    return predict


def probe(fit_feats, fit_t: dict, test_feats, test_t: dict) -> dict:
    """Accuracy (0..1) of each probe of :data:`PROBES` on the test scenes."""
    d = fit_feats.shape[-1]
    acc = {}
    for name, key, classes in (("colour", "cell_color", 7), ("shape", "cell_shape", 6)):
        predict = fit_logistic(fit_feats.reshape(-1, d), fit_t[key].reshape(-1), classes)  # (N*9, D)
        pred, truth = predict(test_feats.reshape(-1, d)), test_t[key].reshape(-1)
        objects = truth > 0
        acc[name] = (pred[objects] == truth[objects]).float().mean().item()
    pooled_fit, pooled_test = fit_feats.mean(1), test_feats.mean(1)  # (N, D)
    predict = fit_logistic(pooled_fit, fit_t["count"], 10)
    acc["count"] = (predict(pooled_test) == test_t["count"]).float().mean().item()
    if fit_t["count"].unique().numel() == 1:  # one shape per scene: nothing to count
        acc["count"] = None
    predict = fit_logistic(pooled_fit, fit_t["occupied"], None)
    acc["position"] = (predict(pooled_test) == test_t["occupied"]).float().mean().item()
    return acc


def chance(fit_t: dict, test_t: dict) -> dict:
    """The majority answer of the fit set, scored as :func:`probe` scores."""
    acc = {}
    for name, key in (("colour", "cell_color"), ("shape", "cell_shape")):
        fit, test = fit_t[key][fit_t[key] > 0], test_t[key][test_t[key] > 0]
        acc[name] = (test == fit.mode().values).float().mean().item()
    acc["count"] = (test_t["count"] == fit_t["count"].mode().values).float().mean().item()
    if fit_t["count"].unique().numel() == 1:
        acc["count"] = None
    majority = (fit_t["occupied"].float().mean(0) > 0.5).long()  # per cell
    acc["position"] = (test_t["occupied"] == majority).float().mean().item()
    return acc


def table(rows: dict, columns: dict | None = None) -> str:
    """A Markdown table: one row per variant name, one column per probe, figures in %.

    ``rows``: ``{name: {probe: accuracy or None}}`` (None: not measured, shown as ``—``);
    ``columns``: an optional second figure per cell, the same way, shown as ``new (old)``.
    """
    lines = ["| layout | " + " | ".join(PROBES) + " |", "|---|" + "---:|" * len(PROBES)]
    for name, acc in rows.items():
        cells = []
        for p in PROBES:
            cell = percent(acc[p])
            if columns is not None:
                cell += f" ({percent(columns[name][p])})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def percent(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"
