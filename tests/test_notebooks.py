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

The numbers reproduce only on the kernels that executed the committed copy: PyTorch promises no bitwise
reproducibility across CPU instruction sets, and a training run that starts one rounding apart ends elsewhere (the
notebooks re-executed with ``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 machine moved a test accuracy by 2.2 points
and a p-value by 26 orders of magnitude, with every outcome unchanged). So the committed notebook records
``kernels_fingerprint()`` in its metadata, and where the re-executing machine's differs, the test compares the
outcome words and how many numbers each cell prints, not their values. ``python tests/test_notebooks.py``
re-executes every notebook in place and records the fingerprint.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch

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
KERNELS = "lightning_wm_kernels"


def kernels_fingerprint() -> str:
    """torch's version, its CPU instruction set, and a hash of what its kernels compute on seeded inputs (a
    convolution, a matmul, softmax, exp, tanh) on one thread: equal fingerprints round alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        images, a = torch.randn(16, 8, 12, 12, generator=g), torch.randn(64, 300, generator=g)
        conv = torch.nn.functional.conv2d(images, torch.randn(16, 8, 3, 3, generator=g), padding=1)
        outputs = torch.cat([t.flatten() for t in (conv, a @ a.T, torch.softmax(a, -1), a.exp(), a.tanh())])
    finally:
        torch.set_num_threads(threads)
    digest = hashlib.sha256(outputs.numpy().tobytes()).hexdigest()[:12]
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {digest}"


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


def execute(notebook, folder: Path) -> None:
    """Run every cell in ``folder``; raises CellExecutionError, with the failing cell's traceback, on any error."""
    nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    ).execute()


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
    execute(notebook, tmp_path)

    rerun = cell_texts(notebook)
    same_kernels = committed.metadata.get(KERNELS) == kernels_fingerprint()
    assert len(rerun) == len(expected)
    for cell, (before, after) in enumerate(zip(expected, rerun)):
        where = f"{name}, code cell {cell}:\n--- committed\n{before}\n--- re-executed\n{after}"
        assert OUTCOME.findall(after) == OUTCOME.findall(before), where
        old, new = NUMBER.findall(before), NUMBER.findall(after)
        assert len(old) == len(new), where
        disagree = [(a, b) for a, b in zip(old, new) if not numbers_agree(a, b)]
        assert not (same_kernels and disagree), f"{disagree}\n{where}"
    assert images(notebook) == images(committed)
    assert not list(NOTEBOOKS.glob("outputs")), "a notebook wrote into the repository"


def test_a_fingerprint_is_recorded_in_every_notebook():
    for path in NOTEBOOKS.glob("*.ipynb"):
        assert nbformat.read(path, as_version=4).metadata.get(KERNELS), f"{path.name}: run tests/test_notebooks.py"


def execute_in_place(path: Path) -> None:
    """Execute the notebook as the test does and write it back with its outputs and this machine's fingerprint."""
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as folder:
        os.environ.update(LIGHTNING_WM_OUTPUT=f"{folder}/outputs", WANDB_MODE="offline", OMP_NUM_THREADS="1")
        execute(notebook, Path(folder))
    notebook.metadata[KERNELS] = kernels_fingerprint()
    nbformat.write(notebook, path)


if __name__ == "__main__":
    for path in [NOTEBOOKS / n for n in sys.argv[1:]] or sorted(NOTEBOOKS.glob("*.ipynb")):
        execute_in_place(path)
        print(f"{path.name}: executed on {kernels_fingerprint()}")
