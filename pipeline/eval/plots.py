"""Plots of evaluation results (matplotlib, Agg backend; written atomically to local paths or s3://)."""
from __future__ import annotations

from pipeline.figures import pyplot, save_png


def plot_accuracy(table, out: str) -> str:
    """Accuracy vs k, one line per (search, method); exact search dashed."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (search, method), accs in table.rows.items():
        ax.plot(table.ks, [100 * a for a in accs], marker="o", ms=3, label=f"{method} ({search})",
                linestyle="--" if search == "exact" else "-")
    ax.set_xlabel("k (neighbours)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"kNN accuracy vs k ({table.n_queries} queries)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_png(fig, out, dpi=100)
