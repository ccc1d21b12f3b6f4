"""The figures of a sweep over several modalities (PNG, matplotlib's Agg canvas, as :mod:`.figures`):

- ``accuracy_heatmap_<A>_<B>.png``: best and last-step accuracy over A's fusion layers × B's, one per
  pair of swept modalities, a row per decoder depth (the thesis' Figure 16 with a modality on each
  axis); with a third swept modality, each cell is the mean over its layers;
- ``ablation.png``: each grid point's accuracy with every modality beside its accuracy without each
  vector modality in turn (``--ablate``), mean ± std over repeats.

One file per pooling setting where the grid has several (suffix ``_pool_<setting>``).
"""

import logging
import math
import statistics
from itertools import combinations
from pathlib import Path

from matplotlib.figure import Figure

from .figures import (
    ACC,
    FUSION,
    _by_pool,
    _cmap,
    _dec_label,
    _fusion_labels,
    _pool_title,
    _save,
)
from .grid import pool_tag

log = logging.getLogger(__name__)

_WHICH = (("best_accuracy_pct", "best during training"), ("last_accuracy_pct", "at the last step"))


def _decs(rows: list) -> list:
    return sorted({r["decoder_layers"] for r in rows}, key=lambda d: -1 if d is None else d)


def pair_heatmaps(rows: list, swept: list, out: Path, encoder_layers, written: list,
                  labels: tuple = (ACC, "VQA accuracy")) -> None:
    acc, name = labels
    """One heatmap per pair of swept modalities (and pooling setting): A's layers × B's layers."""
    pools = _by_pool(rows)
    for a, b in combinations(swept, 2):
        others = [m for m in swept if m not in (a, b)]
        for pool, prs in pools.items():
            suffix = f"_pool_{pool_tag(pool)}" if len(pools) > 1 else ""
            xs, ys = sorted({r["layers"][a] for r in prs}), sorted({r["layers"][b] for r in prs})
            decs = _decs(prs)
            cells = {}
            for r in prs:
                cells.setdefault((r["decoder_layers"], r["layers"][a], r["layers"][b]), []).append(r)
            values = [r[k] for r in prs for k, _ in _WHICH]
            vmin, vmax = min(values), max(values)
            if vmax - vmin < 0.1:  # all alike: a colour scale of ±0.05 points would only show noise
                vmin, vmax = vmin - 0.5, vmax + 0.5
            fig = Figure(figsize=(1.3 * len(xs) * 2 + 3, (0.7 * len(ys) + 1.6) * len(decs) + 1), layout="constrained")
            axes = fig.subplots(len(decs), 2, squeeze=False)
            for row_axes, d in zip(axes, decs):
                for ax, (key, title) in zip(row_axes, _WHICH):
                    im = _heatmap(ax, cells, d, xs, ys, key, vmin, vmax)
                    ax.set_xticks(range(len(xs)), _fusion_labels(xs, encoder_layers))
                    ax.set_yticks(range(len(ys)), _fusion_labels(ys, encoder_layers))
                    ax.set_xlabel(FUSION.format(a))
                    ax.set_ylabel(FUSION.format(b))
                    ax.set_title(f"{title}, {_dec_label(d)} decoder layer(s)", fontsize=10)
            fig.colorbar(im, ax=list(axes.flat), label=acc, shrink=0.9)
            mean = f" (mean over the layers of {', '.join(others)})" if others else ""
            fig.suptitle(f"Where to fuse {a} and {b}: {name}{mean}{_pool_title(pool, len(pools) > 1)}")
            _save(fig, out / f"accuracy_heatmap_{a}_{b}{suffix}.png", written)


def _heatmap(ax, cells: dict, d, xs: list, ys: list, key: str, vmin: float, vmax: float):
    grid = [[statistics.fmean(r[key] for r in cells[(d, x, y)]) if (d, x, y) in cells else math.nan
             for x in xs] for y in ys]
    im = ax.imshow(grid, origin="lower", cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            group = cells.get((d, x, y))
            if not group:
                continue
            value, std = grid[j][i], group[0][key + "_std"] if len(group) == 1 else None
            light = (value - vmin) / ((vmax - vmin) or 1) > 0.6
            ax.text(i, j, f"{value:.1f}" + ("" if std is None else f"\n±{std:.1f}"), ha="center", va="center",
                    fontsize=9, color="black" if light else "white")
    return im


def ablation_bars(ablation: list, out: Path, written: list, labels: tuple = (ACC, "VQA accuracy")) -> None:
    acc, name = labels
    """Bars per grid point: accuracy with every modality, then without each vector modality."""
    if not ablation:
        return
    points = list(dict.fromkeys((a["fuse"], a["decoder_layers"], a["pool"]) for a in ablation))
    removed = list(dict.fromkeys(a["removed"] for a in ablation))
    entries = {(a["fuse"], a["decoder_layers"], a["pool"], a["removed"]): a for a in ablation}
    several_d, several_p = len({p[1] for p in points}) > 1, len({p[2] for p in points}) > 1
    labels = ["\n".join(fuse.split()) + (f"\nd{_dec_label(d)}" if several_d else "")
              + (f"\n{pool}" if several_p else "") for fuse, d, pool in points]
    variants = [None] + removed  # None: every modality
    width = 0.8 / len(variants)
    fig = Figure(figsize=(max(6.0, 1.5 + len(points) * (0.45 * len(variants) + 0.5)), 8.4), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, (key, title) in zip(axes, _WHICH):
        for j, (variant, color) in enumerate(zip(variants, ["dimgray"] + _cmap(len(removed)))):
            xs, ys, es = [], [], []
            for i, (fuse, d, pool) in enumerate(points):
                if variant is None:  # the full point's value, as any of its ablation rows holds it
                    a = next(e for e in ablation if (e["fuse"], e["decoder_layers"], e["pool"]) == (fuse, d, pool))
                    value, std = a["full_" + key], a["full_" + key + "_std"]
                elif (fuse, d, pool, variant) in entries:
                    value, std = entries[fuse, d, pool, variant][key], entries[fuse, d, pool, variant][key + "_std"]
                else:
                    continue
                xs.append(i + (j - (len(variants) - 1) / 2) * width)
                ys.append(value)
                es.append(std or 0)
            bars = ax.bar(xs, ys, width, yerr=es if any(es) else None, capsize=3, color=color,
                          label="every modality" if variant is None else f"without {variant}")
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.set_ylabel(acc)
        ax.set_title(f"{name}, {title}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[1].set_xticks(range(len(points)), labels, fontsize=8)
    axes[1].set_xlabel("grid point (fusion spec)")
    fig.suptitle("Ablation: each vector modality removed in turn (mean ± std over repeats)")
    _save(fig, out / "ablation.png", written)
