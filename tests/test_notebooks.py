"""The notebooks execute top to bottom (nbclient, a real kernel): a cell that raises fails the test.

Both run against one fresh workdir in order, as a reader would: 01 builds the small Fashion-MNIST memory,
02 reuses its shards/embeddings/memory (every stage resumes) and then deletes, compacts and prunes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["01_quickstart.ipynb", "02_unlearning_and_pruning.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_committed_without_outputs(name):
    nb = json.loads((REPO / "notebooks" / name).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code)


@pytest.mark.slow
def test_notebooks_execute(tmp_path, fmnist_dir, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("VMEM_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    for name in NOTEBOOKS:
        nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
        client = NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(REPO)}})
        client.execute()  # raises CellExecutionError naming the cell on the first failure
        images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if "image/png" in o.get("data", {})]
        assert images, f"{name} drew no figure"
        (tmp_path / name).write_text(nbformat.writes(nb))  # executed copy, for a look when debugging
        print(f"{name}: executed, {len(images)} figure(s)")
