"""The figures of a sweep (PNG, matplotlib's Agg canvas; no pyplot, so no global state).

After the thesis "Where to Fuse" (Lund University, 2024):

- ``accuracy_heatmap*.png``: best and last-step VQA accuracy over fusion layer × decoder layers (Fig. 16);
  with several swept modalities, ``accuracy_heatmap_<A>_<B>*.png`` instead: over A's layers × B's
  layers, one per pair, a row per decoder depth (:mod:`.modality_figures`);
- ``fusion_layer*.png``: training steps/s and best accuracy against the fusion layer (Fig. 17; one
  swept modality only);
- ``pooling_<type>.png``: steps/s and accuracy against the pooled length, per pooling type (Figs. 18–21);
- ``accuracy_vs_flops.png``: best accuracy against the FLOPs of one training step, Pareto front marked;
- ``curves.png``: eval accuracy against the training step, every run;
- ``ablation.png``: each grid point's accuracy with every modality and without each vector modality
  in turn (``--ablate``; :mod:`.modality_figures`).

Only the sweep's own points are drawn in the first five; runs of ``--ablate`` go to ``ablation.png``.

A figure whose x axis would hold a single value is skipped with a log line. One file per pooling
setting where the grid has several (suffix ``_pool_<setting>``).
"""

import logging
from dataclasses import replace
from pathlib import Path

from matplotlib.figure import Figure

from .grid import pool_sort_key, pool_tag, swept_modalities

log = logging.getLogger(__name__)

DPI = 120
ACC = "VQA accuracy (%)"


def metric_labels(metric: str) -> tuple:
    """``(axis label, name)`` of a run's ``accuracy`` (``results.json``'s ``metric``): VQA accuracy, an
    exact match, or CIDEr-D (the figures show each times 100)."""
    return {"vqa": (ACC, "VQA accuracy"), "exact": ("accuracy, exact match (%)", "Accuracy"),
            "caption": ("CIDEr-D (×100)", "CIDEr-D"), "label": ("top-1 (%)", "Top-1"),
            "multilabel": ("mAP (%)", "mAP")}.get(metric, (f"{metric} (×100)", metric))
SPEED = "training speed (steps/s)"
FUSION = "fusion layer of the {} tokens"
DECODER = "decoder layers (blocks)"


def _save(fig: Figure, path: Path, written: list) -> None:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})  # no version string: reproducible bytes
    written.append(path)


def _cmap(n: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]


def _fusion_labels(layers: list, encoder_layers: int | None) -> list:
    """Tick labels of fusion layers: 0 is early fusion, the encoder's depth is late fusion."""
    return [f"{L}\n(early)" if L == 0 else f"{L}\n(late)" if L == encoder_layers else str(L) for L in layers]


def _dec_label(d) -> str:
    return "default" if d is None else str(d)


class Where(tuple):
    """Where a grid point's swept modalities join when there are several (sorts as the layers, reads
    ``image3 audio0``): stands in for the fusion layer in the figures that draw a line or colour per layer."""

    def __new__(cls, layers: dict, swept: list):
        where = super().__new__(cls, tuple(layers.get(m) for m in swept))
        where.names = tuple(swept)
        return where

    def __str__(self) -> str:
        return " ".join(f"{m}{layer}" for m, layer in zip(self.names, self))


def _where_label(layer, short: bool = False) -> str:
    """A line's or point's label: ``fusion layer 3`` (``f3``), or ``image3 audio0`` for several modalities."""
    if isinstance(layer, Where):
        return str(layer)
    return f"f{layer}" if short else f"fusion layer {layer}"


def _by_pool(rows: list) -> dict:
    pools = {}
    for r in rows:
        pools.setdefault(r["pool"], []).append(r)
    return pools


def _pool_title(pool: str, several: bool) -> str:
    return f", pooling {pool}" if several else ""


# ---- Figure 16: heatmaps --------------------------------------------------------------------------

def heatmaps(rows: list, out: Path, encoder_layers, written: list, fusion: str = FUSION.format("image"),
             labels: tuple = (ACC, "VQA accuracy")) -> None:
    acc, name = labels
    pools = _by_pool(rows)
    for pool, prs in pools.items():
        layers = sorted({r["fuse_layer"] for r in prs})
        decs = sorted({r["decoder_layers"] for r in prs}, key=lambda d: -1 if d is None else d)
        suffix = f"_pool_{pool_tag(pool)}" if len(pools) > 1 else ""
        if len(layers) < 2 or len(decs) < 2:
            log.info("figure accuracy_heatmap%s skipped: the grid has %d fusion layer(s) and %d decoder depth(s) "
                     "(a heatmap needs two of each)", suffix, len(layers), len(decs))
            continue
        cell = {(r["fuse_layer"], r["decoder_layers"]): r for r in prs}
        values = [r[k] for r in prs for k in ("best_accuracy_pct", "last_accuracy_pct")]
        vmin, vmax = min(values), max(values)
        if vmax - vmin < 0.1:  # all alike: a colour scale of ±0.05 points would only show noise
            vmin, vmax = vmin - 0.5, vmax + 0.5
        fig = Figure(figsize=(1.3 * len(layers) * 2 + 3, 0.7 * len(decs) + 2.6), layout="constrained")
        axes = fig.subplots(1, 2, sharey=True)
        for ax, key, title in ((axes[0], "best_accuracy_pct", "best during training"),
                               (axes[1], "last_accuracy_pct", "at the last step")):
            grid = [[cell[(L, d)][key] if (L, d) in cell else float("nan") for L in layers] for d in decs]
            im = ax.imshow(grid, origin="lower", cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
            for y, d in enumerate(decs):
                for x, L in enumerate(layers):
                    r = cell.get((L, d))
                    if r is None:
                        continue
                    std = r[key + "_std"]
                    text = f"{r[key]:.1f}" + ("" if std is None else f"\n±{std:.1f}")
                    light = (r[key] - vmin) / ((vmax - vmin) or 1) > 0.6
                    ax.text(x, y, text, ha="center", va="center", fontsize=9, color="black" if light else "white")
            ax.set_xticks(range(len(layers)), _fusion_labels(layers, encoder_layers))
            ax.set_yticks(range(len(decs)), [_dec_label(d) for d in decs])
            ax.set_xlabel(fusion)
            ax.set_title(f"{name}, {title}")
        axes[0].set_ylabel(DECODER)
        fig.colorbar(im, ax=list(axes), label=acc, shrink=0.9)
        fig.suptitle(f"Where to fuse: accuracy over fusion layer × decoder depth{_pool_title(pool, len(pools) > 1)}")
        _save(fig, out / f"accuracy_heatmap{suffix}.png", written)


# ---- Figure 17: speed and accuracy against the fusion layer ---------------------------------------

def _errorbar(ax, xs, ys, errs, **kw):
    errs = [0 if e is None else e for e in errs]
    ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3, **kw)


def fusion_layer(rows: list, out: Path, encoder_layers, written: list, fusion: str = FUSION.format("image"),
                 labels: tuple = (ACC, "VQA accuracy")) -> None:
    acc, name = labels
    pools = _by_pool(rows)
    for pool, prs in pools.items():
        layers = sorted({r["fuse_layer"] for r in prs})
        suffix = f"_pool_{pool_tag(pool)}" if len(pools) > 1 else ""
        if len(layers) < 2:
            log.info("figure fusion_layer%s skipped: a single fusion layer (%s)", suffix, layers[0])
            continue
        decs = sorted({r["decoder_layers"] for r in prs}, key=lambda d: -1 if d is None else d)
        fig = Figure(figsize=(11, 4.2), layout="constrained")
        axes = fig.subplots(1, 2)
        for color, d in zip(_cmap(len(decs)), decs):
            line = sorted((r for r in prs if r["decoder_layers"] == d), key=lambda r: r["fuse_layer"])
            xs = [r["fuse_layer"] for r in line]
            label = f"{_dec_label(d)} decoder layer(s)"
            _errorbar(axes[0], xs, [r["steps_per_s"] for r in line], [r["steps_per_s_std"] for r in line],
                      color=color, label=label)
            _errorbar(axes[1], xs, [r["best_accuracy_pct"] for r in line],
                      [r["best_accuracy_pct_std"] for r in line], color=color, label=label)
        for ax, ylabel, title in ((axes[0], SPEED, "Training speed"), (axes[1], acc, f"Best {name}")):
            ax.set_xticks(layers, _fusion_labels(layers, encoder_layers))
            ax.set_xlabel(fusion)
            ax.set_ylabel(ylabel)
            ax.set_title(title + " against the fusion layer")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"Fusion layer{_pool_title(pool, len(pools) > 1)} (mean ± std over repeats)")
        _save(fig, out / f"fusion_layer{suffix}.png", written)


# ---- Figures 18–21: pooling length ----------------------------------------------------------------

def pooling(rows: list, out: Path, full_length, written: list, labels: tuple = (ACC, "VQA accuracy")) -> None:
    acc = labels[0]
    kinds = sorted({r["pool_type"] for r in rows if r["pool_length"] is not None})  # not per-modality ones
    unpooled = [r for r in rows if r["pool_type"] == "none"]
    for kind in kinds:
        prs = [r for r in rows if r["pool_type"] == kind]
        lengths = {r["pool_length"] for r in prs} | ({full_length} if unpooled and full_length else set())
        if len(lengths) < 2:
            log.info("figure pooling_%s skipped: a single pooled length (%s)", kind, sorted(lengths))
            continue
        decs = sorted({r["decoder_layers"] for r in prs}, key=lambda d: -1 if d is None else d)
        layers = sorted({r["fuse_layer"] for r in prs})
        colors = dict(zip(layers, _cmap(len(layers))))
        fig = Figure(figsize=(11, 3.6 * len(decs) + 0.6), layout="constrained")
        axes = fig.subplots(len(decs), 2, squeeze=False)
        for row_axes, d in zip(axes, decs):
            for L in layers:
                line = sorted((r for r in prs if r["decoder_layers"] == d and r["fuse_layer"] == L),
                              key=lambda r: r["pool_length"])
                ref = [r for r in unpooled if r["decoder_layers"] == d and r["fuse_layer"] == L]
                for ax, key in ((row_axes[0], "steps_per_s"), (row_axes[1], "best_accuracy_pct")):
                    std = key + "_std"
                    xs, ys, es = ([r["pool_length"] for r in line], [r[key] for r in line], [r[std] for r in line])
                    if ref and full_length:  # the unpooled run closes the line at the full length
                        xs, ys, es = xs + [full_length], ys + [ref[0][key]], es + [ref[0][std]]
                        ax.plot([full_length], [ref[0][key]], marker="s", markersize=9, color=colors[L],
                                fillstyle="none", linestyle="none")
                    if xs:
                        _errorbar(ax, xs, ys, es, color=colors[L], label=_where_label(L))
            for ax, ylabel in ((row_axes[0], SPEED), (row_axes[1], acc)):
                ax.set_xscale("log", base=2)
                ticks = sorted(lengths)
                ax.set_xticks(ticks, [f"{t}\n(no pooling)" if unpooled and t == full_length else str(t)
                                      for t in ticks])
                ax.minorticks_off()
                ax.set_xlabel("image tokens after pooling (tokens, log scale)")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{kind} pooling, {_dec_label(d)} decoder layer(s)")
                ax.grid(alpha=0.3)
            if unpooled and full_length:
                row_axes[0].plot([], [], marker="s", markersize=9, fillstyle="none", color="gray", linestyle="none",
                                 label=f"no pooling ({full_length} tokens)")
            row_axes[0].legend(fontsize=8)
        fig.suptitle(f"{kind.capitalize()} pooling: speed and best accuracy against the pooled length")
        _save(fig, out / f"pooling_{kind}.png", written)


# ---- accuracy against compute ---------------------------------------------------------------------

def accuracy_vs_flops(rows: list, out: Path, written: list, labels: tuple = (ACC, "VQA accuracy")) -> None:
    if len({r["flops_per_step"] for r in rows}) < 2:
        log.info("figure accuracy_vs_flops skipped: every grid point has the same FLOPs per step")
        return
    several_pools = len({r["pool"] for r in rows}) > 1
    layers = sorted({r["fuse_layer"] for r in rows})
    colors = dict(zip(layers, _cmap(len(layers))))
    flops = [r["flops_per_step"] for r in rows]
    scale, unit = (1e9, "GFLOP") if max(flops) >= 1e9 else (1e6, "MFLOP")
    fig = Figure(figsize=(8, 5.2), layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(sorted(rows, key=lambda r: r["flops_per_step"])):
        ax.errorbar(r["flops_per_step"] / scale, r["best_accuracy_pct"], yerr=r["best_accuracy_pct_std"] or None,
                    marker="o", color=colors[r["fuse_layer"]], capsize=3, markersize=7,
                    markeredgecolor="red" if r["pareto"] else "none", markeredgewidth=1.5)
        label = (f"{_where_label(r['fuse_layer'], short=True)} d{_dec_label(r['decoder_layers'])}"
                 + (f" {r['pool']}" if several_pools else ""))
        ax.annotate(label, (r["flops_per_step"] / scale, r["best_accuracy_pct"]), textcoords="offset points",
                    xytext=(5, 6 if i % 2 == 0 else -13), fontsize=8)  # alternate: neighbours do not overlap
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["flops_per_step"])
    ax.plot([r["flops_per_step"] / scale for r in front], [r["best_accuracy_pct"] for r in front],
            color="red", linestyle="--", drawstyle="steps-post", label="Pareto front (red rims)")
    for L in layers:
        ax.plot([], [], marker="o", linestyle="none", color=colors[L], label=_where_label(L))
    if max(flops) / min(flops) > 8:
        ax.set_xscale("log")
    ax.margins(x=0.1)  # room for the labels of the outermost points
    ax.set_xlabel(f"compute per training step ({unit}, analytical count)")
    ax.set_ylabel("best " + labels[0])
    where = "where each modality joins" if isinstance(layers[0], Where) else "f = fusion layer"
    ax.set_title(f"Accuracy against compute (labels: {where}, d = decoder layers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out / "accuracy_vs_flops.png", written)


# ---- learning curves ------------------------------------------------------------------------------

def curves(records: list, out: Path, written: list, labels: tuple = (ACC, "VQA accuracy")) -> None:
    if all(len(r.history) < 2 for r in records):
        log.info("figure curves skipped: every run has a single evaluation")
        return
    panels = sorted({(r.decoder_layers, r.pool) for r in records},
                    key=lambda k: (-1 if k[0] is None else k[0], pool_sort_key(k[1])))
    several_pools = len({p for _, p in panels}) > 1
    layers = sorted({r.fuse_layer for r in records})
    colors = dict(zip(layers, _cmap(len(layers))))
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(5 * ncols + 0.5, 3.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for ax, (d, pool) in zip(axes.flat, panels):
        seen = set()
        for r in sorted(records, key=lambda r: (r.fuse_layer, r.seed)):
            if (r.decoder_layers, r.pool) != (d, pool) or not r.history:
                continue
            steps, accs = zip(*r.history)
            ax.plot(steps, [100 * a for a in accs], marker=".", color=colors[r.fuse_layer], alpha=0.85,
                    label=None if r.fuse_layer in seen else _where_label(r.fuse_layer))
            seen.add(r.fuse_layer)
        ax.set_title(f"{_dec_label(d)} decoder layer(s)" + (f", pooling {pool}" if several_pools else ""))
        ax.set_xlabel("training step")
        ax.set_ylabel(labels[0])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Eval accuracy during training (one line per run)")
    _save(fig, out / "curves.png", written)


def make_figures(rows: list, records: list, out, encoder_layers: int | None = None,
                 full_length: int | None = None, ablation: list = (), metric: str = "vqa") -> list:
    """Draw every figure the grid allows into ``out``; returns the paths written.

    Args:
        rows: the summary rows (:func:`pipelines.sweep.report.summarise`).
        records: the finished runs (:class:`pipelines.sweep.report.RunRecord`), for the curves.
        encoder_layers: the encoder's depth, to mark late fusion on the axes (None: unmarked).
        full_length: the image's token count without pooling (the "none" point of the pooling figures).
        ablation: the ablation rows (:func:`pipelines.sweep.report.ablation_rows`), for ``ablation.png``.
        metric: the runs' metric, which names the accuracy axes (:func:`metric_labels`).
    """
    from .modality_figures import ablation_bars, pair_heatmaps

    out = Path(out)
    labels = metric_labels(metric)
    written = []
    if not rows:
        log.info("no figures: no finished runs")
        return written
    out.mkdir(parents=True, exist_ok=True)
    own = [r for r in rows if not r.get("ablated")]
    records = [r for r in records if not r.ablated]
    swept = swept_modalities(own)
    if len(swept) > 1:
        pair_heatmaps(own, swept, out, encoder_layers, written, labels)
        log.info("figures accuracy_heatmap and fusion_layer skipped: %d modalities swept (%s); see the "
                 "accuracy_heatmap_<A>_<B> figures", len(swept), ", ".join(swept))
        own = [{**r, "fuse_layer": Where(r["layers"], swept)} for r in own]
        records = [replace(r, fuse_layer=Where(r.layers, swept)) for r in records]
    else:
        vectors = [m for r in own for m in r.get("pools", {})]
        fusion = FUSION.format(swept[0] if swept else (vectors or ["image"])[0])
        heatmaps(own, out, encoder_layers, written, fusion, labels)
        fusion_layer(own, out, encoder_layers, written, fusion, labels)
    pooling(own, out, full_length, written, labels)
    accuracy_vs_flops(own, out, written, labels)
    curves(records, out, written, labels)
    ablation_bars(ablation, out, written, labels)
    return written
