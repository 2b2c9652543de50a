"""The paper's figures as PNG files (matplotlib, no display needed):

- ``svd_projection``: the embedding rows on their top two singular directions, coloured by
  frequency group (Figures 1 and 3a-b);
- ``singular_values``: normalised singular values of the embedding matrix (Figure 3c);
- ``rare_group_size``: AGG's rare-group size over training updates (Figure 4);
- ``isotropy_over_training``: I(W), total and per group, over training updates (Figure 2);
- ``alpha_sweep``: perplexity, Uniq and I(W) against AGG's alpha (Figure 5).

Each function takes plain data and a file name and returns the file name written. A series
without points is named in the figure ("no points: ...") rather than left out silently.
"""

from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from fairseq_agg import metrics  # noqa: E402

GROUP_COLOURS = {"frequent": "#d62728", "medium": "#2ca02c", "rare": "#1f77b4"}


def _no_points(ax, names: Sequence[str]) -> None:
    if names:
        ax.text(0.5, 0.5, "no points: " + ", ".join(names), transform=ax.transAxes, ha="center", va="center",
                fontsize=9, color="0.4", wrap=True)


def _save(fig, path: Path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def svd_projection(path: Path, weight, groups: Mapping[str, Sequence[int]], title: str = "") -> str:
    points = metrics.svd_projection(weight)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    # rare drawn last so that it is not hidden under the larger groups
    for name in ("frequent", "medium", "rare"):
        if name in groups and len(groups[name]):
            xy = points[list(groups[name])]
            ax.scatter(xy[:, 0], xy[:, 1], s=3, alpha=0.6, c=GROUP_COLOURS[name],
                       label=f"{name} ({len(groups[name])})", linewidths=0)
    ax.set_xlabel("singular direction 1")
    ax.set_ylabel("singular direction 2")
    ax.set_title(("Embedding rows, top-2 SVD projection" + (f": {title}" if title else "")), fontsize=10)
    ax.legend(markerscale=4, fontsize=8)
    return _save(fig, path)


def singular_values(path: Path, spectra: Mapping[str, Sequence[float]]) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, values in spectra.items():
        ax.plot(range(1, len(values) + 1), values, label=name or None)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / largest")
    ax.set_ylim(0, 1.02)
    ax.set_title("Normalised singular values of the output embedding", fontsize=10)
    if any(spectra):
        ax.legend(fontsize=8)
    return _save(fig, path)


def rare_group_size(path: Path, series: Mapping[str, List[Tuple[int, float]]]) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    empty = []
    for name, points in series.items():
        if points:
            updates, sizes = zip(*points)
            ax.plot(updates, sizes, marker=".", label=name)
        else:
            empty.append(name)
    _no_points(ax, empty)
    ax.set_xlabel("training update")
    ax.set_ylabel("rare tokens (AGG group)")
    ax.set_title("Size of AGG's rare-token group during training", fontsize=10)
    if len(empty) < len(series):
        ax.legend(fontsize=8)
    return _save(fig, path)


def isotropy_over_training(path: Path, series: Mapping[str, List[Dict]]) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"total": "-", "frequent": "--", "medium": "-.", "rare": ":"}
    empty = [name for name, points in series.items() if not points]
    _no_points(ax, empty)
    for run_index, (name, points) in enumerate(series.items()):
        colour = f"C{run_index}"
        updates = [p["update"] for p in points]
        for key, style in styles.items():
            values = [p.get(key) for p in points]
            if all(v is not None for v in values):
                ax.plot(updates, values, style, color=colour, marker="." if key == "total" else None,
                        label=f"{name} {key}".strip())
    ax.set_xlabel("training update")
    ax.set_ylabel("I(W)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Isotropy I(W) of the output embedding during training", fontsize=10)
    if len(empty) < len(series):
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def alpha_sweep(path: Path, points: Sequence[Dict]) -> str:
    """``points``: dicts with ``alpha``, ``ppl``, ``uniq`` and ``isotropy``, one per run."""
    alphas = [p["alpha"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    for ax, (key, label) in zip(axes, (("ppl", "perplexity"), ("uniq", "Uniq"), ("isotropy", "I(W)"))):
        ax.plot(alphas, [p[key] for p in points], marker="o")
        ax.set_xlabel("alpha")
        ax.set_ylabel(label)
        ax.set_xticks(alphas)
    fig.suptitle("Sensitivity to AGG's alpha", fontsize=10)
    return _save(fig, path)
