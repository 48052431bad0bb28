"""The notebooks of ``notebooks/`` reproduce their committed outputs.

Each notebook is committed executed (seeded, deterministic Trainers, one thread). The test re-executes a copy with
nbclient in a temporary working folder (``LIGHTNING_WM_OUTPUT`` points into ``tmp_path``, so nothing is written
into the repository) and compares, cell by cell, what the re-executed cells print with what the committed cells
show:

* the outcome words, in order: ``WATERMARKED`` / ``not watermarked`` / ``UNDECIDABLE`` per suspect, and the
  benchmark's ``kept`` / ``removed`` / ``removed, over budget`` / ``not embedded`` / ``undecidable`` / ``n/a`` /
  ``error`` per cell, exactly;
* every printed number, within ``TOLERANCE``: integers (counts, queries, epochs, false positives) exactly;
  numbers in e-notation (p-values such as ``2.58e-90``) within a factor of 10 (``|log10 a - log10 b| <= 1``);
  percentages, and decimals of 1 or more (the benchmark table's accuracies in %), within 1 point; other decimals
  below 1 (key accuracy, bit error rate, correlation, p-values such as ``0.679``) within 0.05.

Lines that report a duration (``12 s``) are left out: they measure the machine, not the notebook.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = [
    "01_owner_walkthrough.ipynb",
    "02_subclassing.ipynb",
    pytest.param("03_robustness_matrix.ipynb", marks=pytest.mark.slow),  # a minute: its benchmark trains 20 models
]
CELL_TIMEOUT = 300
TOLERANCE = {"percent": 1.0, "fraction": 0.05, "log10": 1.0}

OUTCOME = re.compile(
    r"WATERMARKED|not watermarked|UNDECIDABLE|removed, over budget|\bremoved\b|\bkept\b|not embedded"
    r"|\bundecidable\b|\bn/a\b|\berror\b"
)
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:e[-+]?\d+)?%?(?![\w.])")
DURATION = re.compile(r"\d s\b")


def cell_texts(notebook) -> list[str]:
    """Per code cell, the text it showed: streams, and Markdown or plain results that are not figures."""
    texts = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        parts = []
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                parts.append(output["text"])
            elif output["output_type"] in ("display_data", "execute_result"):
                data = output.get("data", {})
                if "text/markdown" in data:
                    parts.append(data["text/markdown"])
                elif "image/png" not in data:
                    parts.append(data.get("text/plain", ""))
        lines = "".join(parts).splitlines()
        texts.append("\n".join(line for line in lines if not DURATION.search(line)))
    return texts


def images(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


def errors(notebook) -> list[str]:
    return [
        f"{output['ename']}: {output['evalue']}"
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output["output_type"] == "error"
    ]


def numbers_agree(committed: str, rerun: str) -> bool:
    """Whether two printed numbers agree within ``TOLERANCE`` (see the module docstring)."""
    a, b = float(committed.rstrip("%")), float(rerun.rstrip("%"))
    if "e" in committed + rerun:
        return a == b or (a > 0 and b > 0 and abs(math.log10(a) - math.log10(b)) <= TOLERANCE["log10"])
    if "." not in committed + rerun:
        return a == b
    if committed.endswith("%") or abs(a) >= 1:
        return abs(a - b) <= TOLERANCE["percent"]
    return abs(a - b) <= TOLERANCE["fraction"]


def test_numbers_agree_within_the_stated_tolerance():
    assert numbers_agree("96.7%", "96.1%")
    assert not numbers_agree("96.7%", "95.6%")
    assert numbers_agree("98.3", "97.5")
    assert numbers_agree("0.96", "0.92")
    assert not numbers_agree("0.96", "0.90")
    assert numbers_agree("2.58e-90", "9e-91")
    assert not numbers_agree("2.58e-90", "2e-88")
    assert numbers_agree("200", "200")
    assert not numbers_agree("200", "201")


def test_every_notebook_is_tested():
    names = [n.values[0] if hasattr(n, "values") else n for n in NAMES]
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == names


@pytest.mark.parametrize("name", NAMES)
def test_notebook_reproduces_its_committed_outputs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_WM_OUTPUT", str(tmp_path / "outputs"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    expected = cell_texts(committed)
    assert not errors(committed), f"{name} was committed with an error"
    assert OUTCOME.search("\n".join(expected)), f"{name} was committed without its outputs"

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the failing cell's traceback, on any error

    rerun = cell_texts(notebook)
    assert len(rerun) == len(expected)
    for cell, (before, after) in enumerate(zip(expected, rerun)):
        where = f"{name}, code cell {cell}:\n--- committed\n{before}\n--- re-executed\n{after}"
        assert OUTCOME.findall(after) == OUTCOME.findall(before), where
        old, new = NUMBER.findall(before), NUMBER.findall(after)
        assert len(old) == len(new), where
        disagree = [(a, b) for a, b in zip(old, new) if not numbers_agree(a, b)]
        assert not disagree, f"{disagree}\n{where}"
    assert images(notebook) == images(committed)
    assert not list(NOTEBOOKS.glob("outputs")), "a notebook wrote into the repository"
