"""Checked command-line inputs: argparse types for counts, labels and ids, and `.npy` vector files.

Each refuses bad input with one line that names the input and says what is expected (argparse prints it for
the types, a UserError for files), before the memory is opened for writing, so a refused command changes
nothing.
"""
from __future__ import annotations

import argparse
import io
import sys
from typing import Optional

import numpy as np

from pipeline import storage
from pipeline.embed.parts import check_vectors
from pipeline.errors import UserError

MAX_ID = 2 ** 63 - 1  # ids are positive int64 (pipeline.data.ids.stable_id)


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (k, nprobe, counts)."""
    value = _int(text, "value")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def label(text: str) -> int:
    """argparse type: a class label, an integer >= 0 (-1 is what results show for a missing label)."""
    value = _int(text, "a label")
    if value < 0:
        raise argparse.ArgumentTypeError(f"labels are integers >= 0, got {value} (-1 stands for 'no label')")
    return value


def item_id(text: str) -> int:
    """argparse type: an item id, a positive 63-bit integer (as `vmem add` and `vmem query` print them)."""
    value = _int(text, "an item id")
    if not 0 < value <= MAX_ID:
        raise argparse.ArgumentTypeError(f"item ids are integers in 1..2**63-1, got {value}")
    return value


def note(message: str) -> None:
    """One informational line on stderr (stdout stays the command's result)."""
    print(f"vmem: note: {message}", file=sys.stderr)


def load_vectors(path: str, dim: Optional[int] = None, what: str = "--vectors") -> np.ndarray:
    """The (n, dim) float32 vectors saved with `numpy.save` in `path` (local or s3://).

    Refused with a UserError naming the file: a missing file, anything that is not a plain .npy array
    (pickles, object arrays, .npz archives, text), non-numeric values, an array that is not 2-d, no rows, a
    dimension other than `dim`, NaN or infinite values. Integer arrays are converted to float32 (exact for
    the small integers such files hold) and a note says so.
    """
    name = f"{what} {path}"
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{name}: cannot read it: {e}") from None
    try:
        x = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        if "Object arrays" in str(e):
            raise UserError(f"{name} holds Python objects (dtype object); expected an (n, dim) array of numbers "
                            f"saved with numpy.save") from None
        raise UserError(f"{name} is not a .npy file; expected an (n, dim) array of numbers saved with "
                        f"numpy.save") from None
    except (OSError, EOFError) as e:  # truncated header or data
        raise UserError(f"{name} is not a readable .npy file ({e}); expected an (n, dim) array of numbers "
                        f"saved with numpy.save") from None
    if isinstance(x, np.lib.npyio.NpzFile):
        raise UserError(f"{name} is an .npz archive; give one (n, dim) array saved with numpy.save")
    if x.dtype.kind in "iu":
        note(f"{path} holds {x.dtype} values: converted to float32 vectors")
        x = x.astype(np.float32)
    elif x.dtype.kind != "f":
        raise UserError(f"{name} holds values of dtype {x.dtype}; expected floating-point (or integer) numbers")
    if x.ndim != 2:
        hint = ": save one vector as x[None, :]" if x.ndim == 1 else ""
        raise UserError(f"{name} holds an array of shape {x.shape}; vectors must be a 2-d array (n, dim){hint}")
    if x.shape[0] == 0:
        raise UserError(f"{name} holds no vectors (shape {x.shape}); expected at least one row")
    if dim is not None and x.shape[1] != dim:
        raise UserError(f"{name} holds {x.shape[1]}-d vectors, but this memory's vectors are {dim}-d")
    return check_vectors(x, dim, what=f"the vectors in {path} ({what})")  # NaN/inf: a DataError, one line
