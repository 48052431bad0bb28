"""benchmarks/gpu.py runs end to end on CPU with --tiny and prints its table with every column."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_tiny_prints_its_table(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu.py"), "--tiny", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    header = next(line for line in done.stdout.splitlines() if line.startswith("| scheme"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["scheme", "ms_per_step", "samples_per_s", "overhead", "overhead_min", "setup_s", "note"]
    rows = json.loads(out.read_text())["overhead"]
    assert rows[0]["scheme"] == "plain"
    assert rows[0]["overhead"] == 1.0
    assert len(rows) == 3  # plain and two schemes
    assert all(r["ms_per_step"] > 0 and r["samples_per_s"] > 0 for r in rows if not r["note"])
