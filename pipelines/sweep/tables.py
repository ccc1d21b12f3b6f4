"""The summary of a sweep as Markdown (``summary.md``, and what ``fuse-sweep`` prints)."""

from pathlib import Path

from .grid import swept_modalities


def _pm(mean, std, digits: int = 1) -> str:
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _dec(d) -> str:
    return "default" if d is None else str(d)


def markdown_table(rows: list) -> str:
    """The grid points: by fusion layer when one modality is swept and nothing is ablated, else by
    fusion spec (``--fuse``) and the modalities a run goes without."""
    by_layer = len(swept_modalities(rows)) <= 1 and not any(r.get("ablated") for r in rows)
    first = "| fusion layer |" if by_layer else "| fusion (--fuse) | without |"
    head = (f"{first} decoder layers | pooling | repeats | best acc. (%) | last acc. (%) | steps/s "
            "| samples/s | params | GFLOP/step | Pareto |")
    lines = [head, "|" + ("---:|" if by_layer else ":---|:---|") + "---:|" * 3 + "---:|" * 6 + ":---:|"]
    for r in rows:
        where = f"| {r['fuse_layer']} |" if by_layer else f"| `{r['fuse']}` | {r['ablated'] or '—'} |"
        lines.append(
            f"{where} {_dec(r['decoder_layers'])} | {r['pool']} "
            f"| {r['repeats']} | {_pm(r['best_accuracy_pct'], r['best_accuracy_pct_std'])} "
            f"| {_pm(r['last_accuracy_pct'], r['last_accuracy_pct_std'])} "
            f"| {_pm(r['steps_per_s'], r['steps_per_s_std'], 2)} | {r['samples_per_s']:.0f} | {r['params']:,} "
            f"| {r['flops_per_step'] / 1e9:.3g} | {'★' if r['pareto'] else ''} |")
    return "\n".join(lines)


def ablation_table(ablation: list) -> str:
    """Each grid point's accuracy with every modality, and without each vector modality in turn."""
    head = ("| fusion (--fuse) | decoder layers | pooling | without | best acc. (%) | best acc. with all (%) "
            "| drop (points) | last acc. (%) | repeats |")
    lines = [head, "|:---|---:|---:|:---|---:|---:|---:|---:|---:|"]
    for a in ablation:
        lines.append(
            f"| `{a['fuse']}` | {_dec(a['decoder_layers'])} | {a['pool']} | {a['removed']} "
            f"| {_pm(a['best_accuracy_pct'], a['best_accuracy_pct_std'])} "
            f"| {_pm(a['full_best_accuracy_pct'], a['full_best_accuracy_pct_std'])} | {a['best_drop_pct']:+.1f} "
            f"| {_pm(a['last_accuracy_pct'], a['last_accuracy_pct_std'])} | {a['repeats']} |")
    return "\n".join(lines)


WHAT = {"vqa": "the VQA accuracy", "exact": "exact match with the label",
        "caption": "CIDEr-D (times 100)", "label": "top-1 over the closed label set (the likeliest label)",
        "multilabel": "mAP over the labels (from their likelihoods)"}  # the runs' metric (results.json)


def summary_markdown(summary: dict) -> str:
    """``summary.md``: the grid points, the ablation, the runs left out, the figures."""
    out = [f"# Sweep summary: {summary['runs_dir']}", "",
           f"{summary['finished']} finished run(s) in {len(summary['points'])} grid point(s); "
           f"{len(summary['failed'])} failed; {len(summary['broken'])} broken.", "",
           f"Accuracy: {WHAT.get(summary.get('metric') or 'vqa', 'the accuracy')} on the eval side, best during "
           "training and at the last step, "
           "mean ± sample standard deviation over repeats. Steps/s: training steps per second (eval "
           "excluded). GFLOP/step: analytical count of one training step. ★: on the Pareto front of best "
           "accuracy against FLOPs per step (the sweep's own points; ablations left out).", "",
           markdown_table(summary["points"]), ""]
    if summary["ablation"]:
        note = ("The same grid point trained without one vector modality (`--ablate`); drop: best accuracy "
                "with every modality minus without this one.")
        out += ["## Ablation: each vector modality removed in turn", "", note, "",
                ablation_table(summary["ablation"]), ""]
    for what in ("failed", "broken"):
        if summary[what]:
            out += [f"## {what.capitalize()} runs (not in the table)", ""]
            out += [f"- `{b['run']}`: {b['reason']}" for b in summary[what]] + [""]
    if summary["figures"]:
        out += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in summary["figures"]] + [""]
    return "\n".join(out)
