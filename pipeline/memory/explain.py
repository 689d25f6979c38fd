"""The explanation sheet: a query beside its k neighbours with labels, distances, vote weights and totals."""
from __future__ import annotations

import io
import math
from typing import Callable

from PIL import Image

from pipeline.figures import pyplot, save_png


def _thumb(load_image: Callable[[int], bytes], item_id: int):
    try:
        return Image.open(io.BytesIO(load_image(item_id))).convert("RGB")
    except Exception:  # embedding-only items have no image: the tile shows its text alone
        return None


def render_sheet(load_image: Callable[[int], bytes], pred, query_image, out: str, cols: int = 5) -> str:
    """Write a PNG at `out` (local or s3://): query, neighbours (image via `load_image(id)`, label, d, weight),
    vote totals."""
    plt = pyplot()

    nbrs = pred.neighbors
    rows = 1 + math.ceil(len(nbrs) / cols)
    fig = plt.figure(figsize=(2.4 * (cols + 2), 2.6 * rows))
    gs = fig.add_gridspec(rows, cols + 2)
    ax = fig.add_subplot(gs[0, 0])
    if query_image is not None:
        ax.imshow(query_image.convert("RGB"))
    ax.set_title(f"query\n-> {pred.label_name} ({pred.method})", fontsize=9)
    ax.axis("off")
    ax = fig.add_subplot(gs[0, 1:])
    names = list(pred.scores)[:12]
    ax.barh(names[::-1], [pred.scores[n] for n in names][::-1], color="tab:blue")
    ax.set_title("vote totals per class", fontsize=9)
    for j, n in enumerate(nbrs):
        r, c = 1 + j // cols, j % cols
        ax = fig.add_subplot(gs[r, c + (1 if c >= 0 else 0)])
        im = _thumb(load_image, n.id)
        if im is not None:
            ax.imshow(im)
        extra = "" if n.multiplier == 1.0 else f" x{n.multiplier:g}"
        relabel = "" if n.original_label is None else f" (was {n.original_label})"
        ax.set_title(f"#{j} {n.label_name}{relabel}\nd={n.distance:.3f} w={n.weight:.3g}{extra}", fontsize=8,
                     color="green" if n.label == pred.label else "red")
        ax.axis("off")
    return save_png(fig, out, dpi=80)
