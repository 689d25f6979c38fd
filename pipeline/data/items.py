"""The metadata every item carries, declared once: the embedding parts, the shard metadata files, the memory's
item table, search results (`Neighbors`) and the API all derive their columns from `ITEM_FIELDS`.

An item is identified by `id` (int64, `stable_id(key)`); its metadata travels with it from the WebDataset
shard that holds its image to every answer that returns it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class ItemField:
    name: str  # column name in parts, shard metadata and the item table
    type: pa.DataType
    fill: Any  # the value of a missing item (search padding, rows without it)
    hit_name: Optional[str]  # the `Neighbors` array that carries it with each search hit (None: not returned)

    @property
    def dtype(self):
        return np.int64 if pa.types.is_integer(self.type) else object


ITEM_FIELDS = (
    ItemField("label", pa.int64(), -1, "labels"),  # -1: no label (labels given by users are >= 0)
    ItemField("label_name", pa.string(), "", "label_names"),
    ItemField("key", pa.string(), "", "keys"),  # the external key; id = stable_id(key)
    ItemField("source", pa.string(), "", "sources"),  # where the item came from (a dataset, "api", ...)
    ItemField("shard", pa.string(), "", None),  # URL of the WebDataset tar holding its image ("" = none)
)
META_FIELDS = tuple(f.name for f in ITEM_FIELDS)
META_COLUMNS = ("id", *META_FIELDS)  # an item's row: its id and its metadata
META_SCHEMA = pa.schema([("id", pa.int64()), *((f.name, f.type) for f in ITEM_FIELDS)])
HIT_FIELDS = tuple(f for f in ITEM_FIELDS if f.hit_name)  # the metadata a search returns with each hit
