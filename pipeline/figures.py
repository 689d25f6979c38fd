"""Matplotlib figures as PNG files: one place that picks the headless backend and writes atomically."""
from __future__ import annotations

import io


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed: servers, CI, Ray workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, out: str, dpi: int = 100) -> str:
    """Write `fig` as a PNG to `out` (local path or s3://) atomically, close it, return `out`."""
    from pipeline import storage

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    storage.atomic_write_bytes(out, buf.getvalue())
    return out
