"""The README as a user reads it: it starts with the set-up, main-job and test commands, `.ci/run` calls that test
command, and every command block marked ``<!-- runnable -->`` runs as written (on digits, in a fresh folder)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_wm.benchmark.report import STATUS_COLOURS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"(<!-- runnable(?::\s*(\w+))? -->\n)?```(\w+)\n(.*?)```", re.S)


def _blocks(marker: str | None) -> list[tuple[str, str]]:
    """(language, code) of the blocks marked ``<!-- runnable -->`` (marker None) or ``<!-- runnable: marker -->``."""
    return [(m[3], m[4]) for m in BLOCK.finditer(README) if m[1] and m[2] == marker]


def test_readme_starts_with_setup_main_job_and_test_commands():
    first = [m[4].strip() for m in list(BLOCK.finditer(README))[:3]]
    assert first == [
        'pip install -e ".[dev]"',
        "lightning-wm benchmark --config configs/benchmark/quickstart.yaml",
        "pytest -q",
    ]
    assert "pytest -q" in (ROOT / ".ci" / "run").read_text()


def _run(tmp_path: Path, blocks: list[tuple[str, str]]) -> None:
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "WANDB_MODE": "offline", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for language, code in blocks:
        if language == "python":
            result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
            assert result.returncode == 0, result.stderr[-3000:]
            assert "WATERMARKED" in result.stdout
            continue
        for line in code.strip().splitlines():
            result = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
            assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
            if line.startswith("lightning-wm verify"):
                assert ": WATERMARKED" in result.stdout, result.stdout


@pytest.mark.slow  # two minutes on 2 cores: in the second step of .ci/run, beside the main job
def test_every_runnable_block_of_the_readme_runs_as_written(tmp_path):
    blocks = _blocks(None)
    assert len(blocks) >= 5
    _run(tmp_path, blocks)


@pytest.mark.slow
def test_the_main_job_runs_as_written(tmp_path):
    """The README's main job writes its table: one row per scheme of the config, unattacked ("none") and after each
    of its attacks, every cell computed (no "error"), every scheme declared on its own marked model, and the
    Markdown table and heatmap beside the CSV."""
    blocks = _blocks("slow")
    assert len(blocks) == 1
    _run(tmp_path, blocks)
    config = yaml.safe_load((ROOT / "configs" / "benchmark" / "quickstart.yaml").read_text())
    out = tmp_path / config["output_dir"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    cells = [(row["scheme"], row["attack"]) for row in rows]
    assert sorted(cells) == sorted((s, a) for s in config["schemes"] for a in ["none", *config["attacks"]])
    statuses = {row["status"] for row in rows}
    assert statuses <= set(STATUS_COLOURS) - {"error"}, statuses
    assert {row["status"] for row in rows if row["attack"] == "none"} == {"kept"}, "every scheme is embedded"
    table = (out / "results.md").read_text().strip().splitlines()
    assert len(table) == 2 + len(rows)
    assert not any("| error" in line for line in table)
    assert (out / "heatmap.png").stat().st_size > 0
