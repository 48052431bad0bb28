"""The notebooks of ``notebooks/`` run top to bottom (fast mode) and show their key results.

Each notebook is executed with nbclient in a temporary working directory, with ``LIGHTNING_WM_FAST=1`` (a few
epochs) and ``LIGHTNING_WM_OUTPUT`` pointing into ``tmp_path``, so nothing is written into the repository.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT = 300

# notebook -> texts its outputs must contain
EXPECTED = {
    "01_owner_walkthrough.ipynb": [
        "WATERMARKED",
        "not watermarked",
        "independent (unmarked)",
        "key tensors in the checkpoint: False",
        "p_value",
        "threshold",
    ],
    "02_subclassing.ipynb": [
        "black-box : trigger_set: WATERMARKED",
        "white-box : uchida: WATERMARKED",
        "not watermarked",
    ],
    "03_robustness_matrix.ipynb": ["| scheme | attack |", "| distill |", "same outcomes: True"],
}
EXPECTED_IMAGES = {"01_owner_walkthrough.ipynb": 3, "02_subclassing.ipynb": 0, "03_robustness_matrix.ipynb": 1}


def output_texts(notebook) -> tuple[str, int]:
    """All text the executed cells showed (streams, plain and Markdown results) and the number of PNG images."""
    texts, images = [], 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                texts.append(output["text"])
            elif output["output_type"] in ("display_data", "execute_result"):
                data = output.get("data", {})
                texts += [data.get("text/plain", ""), data.get("text/markdown", "")]
                images += "image/png" in data
    return "\n".join(texts), images


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_WM_FAST", "1")
    monkeypatch.setenv("LIGHTNING_WM_OUTPUT", str(tmp_path / "outputs"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: threads only contend on a shared CPU
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the failing cell's traceback, on any error

    text, images = output_texts(notebook)
    for expected in EXPECTED[name]:
        assert expected in text, f"{name}: {expected!r} not in its outputs"
    assert "Traceback" not in text
    assert images >= EXPECTED_IMAGES[name], f"{name}: {images} images, expected {EXPECTED_IMAGES[name]}"
    assert not list(NOTEBOOKS.glob("outputs")), "a notebook wrote into the repository"
