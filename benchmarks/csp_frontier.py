"""CSP's frontier: black-box queries to p < 1e-6 on the marked model against accuracy cost against survival of
distillation, one point per perturbation amplitude, through the README's own commands.

    python benchmarks/csp_frontier.py --amplitudes 0.05 0.1 0.2 0.3 --seeds 0 --out frontier

For each seed it fits ``configs/digits/baseline.yaml``, then for each amplitude ``configs/digits/csp.yaml`` with
that amplitude, tests it, and distils an MLP student from it with ``configs/attacks/distillation.yaml``. Both
are verified on the first q of the key's queries for each q of ``--queries`` (all customers tested, Bonferroni,
as ``verify`` does) against ``--null-keys`` null projections (a rank p-value can only reach 1e-6 with two
customers when ``2/(N + 1) < 1e-6``), and the student also as ``verify`` gives it with the config's key (1,999
null projections, all its queries). Writes ``frontier.csv`` and ``frontier.png`` to ``--out`` and prints
a Markdown table; ``--replot`` merges earlier ``frontier.csv`` files (e.g. runs of other seeds) and redraws.
"Queries to p < 1e-6" is the first q of the grid that reaches it: a description of the frontier, not a test (a
test fixes its number of queries before querying).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from config_costs import accuracy_on_test, run_cli, top1_accuracy

if TYPE_CHECKING:
    from lightning_wm.watermarks.csp import CSPKey

ROOT = Path(__file__).resolve().parent.parent
LEVEL = 1e-6


def _p_values(key: CSPKey, model: torch.nn.Module, queries: list[int], null_keys: int) -> dict[int, float]:
    x = key.tensors["queries"]
    return {q: key.verify(model, inputs=x[:q], null_keys=null_keys).p_value for q in queries}


def measure(amplitude: float, seed: int, args: argparse.Namespace, cwd: Path) -> dict[str, Any]:
    """Fit, test and distil CSP at one amplitude and seed in ``cwd``; the p-values of the marked model and its
    student at every query count, and the student's verdict as ``verify`` gives it."""
    from lightning_wm import ImageClassifier
    from lightning_wm.attacks import DistillationAttack
    from lightning_wm.cli import load_weights
    from lightning_wm.data import DigitsDataModule
    from lightning_wm.models import MLP
    from lightning_wm.verify import load_key

    config = ROOT / "configs/digits/csp.yaml"
    options = f"--watermarks.csp.init_args.signal.amplitude={amplitude}"
    run_cli(["fit", "--config", str(config), "--seed_everything", str(seed), options], cwd)
    ckpt = cwd / "outputs/digits/csp/last.ckpt"
    accuracy = accuracy_on_test(config, ckpt, cwd)
    distillation = ROOT / "configs/attacks/distillation.yaml"
    run_cli(
        ["fit", "--config", str(distillation), "--seed_everything", str(seed), f"--model.init_args.victim={ckpt}"], cwd
    )
    student_ckpt = cwd / "outputs/digits/attacks/distillation/last.ckpt"

    key = load_key(cwd / "outputs/digits/csp.key")
    marked = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    student = DistillationAttack(str(ckpt), student=MLP(in_features=64, num_classes=10, hidden=[256, 256]))
    load_weights(student, student_ckpt)
    student.eval()
    x, y = DigitsDataModule().dataset("test").tensors[:2]
    student_accuracy = top1_accuracy(student, x, y)
    marked_p = _p_values(key, marked, args.queries, args.null_keys)
    student_p = _p_values(key, student, args.queries, args.null_keys)
    shipped = key.verify(student)
    return {
        "amplitude": amplitude,
        "seed": seed,
        "accuracy": accuracy,
        "queries_to_level": next((q for q in args.queries if marked_p[q] < LEVEL), None),
        **{f"marked_p@{q}": p for q, p in marked_p.items()},
        "student_accuracy": student_accuracy,
        **{f"student_p@{q}": p for q, p in student_p.items()},
        "student_p_shipped": shipped.p_value,
        "student_declared": shipped.is_watermarked,
        "student_customer": shipped.details["customer"],
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Three panels against the amplitude, one point per seed: accuracy against the baseline of the same seed,
    queries to p < 1e-6 on the marked model, and the distilled student's p-value as ``verify`` gives it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy, queries, student) = plt.subplots(1, 3, figsize=(12, 3.6))
    amplitudes = sorted({float(r["amplitude"]) for r in rows})
    for axis in (accuracy, queries, student):
        axis.set_xscale("log")
        axis.set_xticks(amplitudes, [f"{a:g}" for a in amplitudes])
        axis.minorticks_off()
        axis.set_xlabel("amplitude ε")

    def by_amplitude(value: Callable[[dict[str, Any]], float]) -> tuple[list[float], list[float]]:
        points = [(float(r["amplitude"]), value(r)) for r in rows]
        return [a for a, _ in points], [v for _, v in points]

    accuracy.scatter(*by_amplitude(lambda r: float(r["accuracy"]) - float(r["baseline_accuracy"])), color="C0")
    accuracy.axhline(-0.5, color="grey", linestyle="--", linewidth=1)
    accuracy.axhline(0.0, color="grey", linewidth=0.5)
    accuracy.set_ylabel("test accuracy − baseline (points)")
    grid = sorted(int(k.split("@")[1]) for k in rows[0] if k.startswith("marked_p@"))
    unreached = 2 * grid[-1]
    queries.scatter(*by_amplitude(lambda r: float(r["queries_to_level"] or unreached)), color="C1")
    queries.axhline(50, color="grey", linestyle="--", linewidth=1)
    queries.set_yscale("log")
    queries.set_yticks([*grid, unreached], [*map(str, grid), "not reached"])
    queries.minorticks_off()
    queries.set_ylabel("queries to p < 1e-6, marked model")
    student.scatter(*by_amplitude(lambda r: float(r["student_p_shipped"])), color="C2")
    student.axhline(0.01, color="grey", linestyle="--", linewidth=1)
    student.set_yscale("log")
    student.set_ylabel("distilled student's p (verify)")
    figure.suptitle("CSP on digits: accuracy, queries and survival of distillation, by amplitude")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def table(rows: list[dict[str, Any]]) -> str:
    """One Markdown row per amplitude and seed."""
    lines = [
        "| amplitude | seed | accuracy − baseline | queries to p < 1e-6 | student acc | student p (verify) | named |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        needed = row["queries_to_level"] or "not reached"
        delta = float(row["accuracy"]) - float(row["baseline_accuracy"])
        lines.append(
            f"| {float(row['amplitude']):g} | {row['seed']} | {delta:+.2f} | {needed} | "
            f"{float(row['student_accuracy']):.2f} | {float(row['student_p_shipped']):.2g} | "
            f"{row['student_customer'] or '–'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amplitudes", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--queries", type=int, nargs="+", default=[25, 50, 100, 200, 400])
    parser.add_argument("--null-keys", type=int, default=2_999_999)
    parser.add_argument("--out", type=Path, default=Path("csp_frontier"))
    parser.add_argument("--replot", type=Path, nargs="+", help="only plot and tabulate these frontier.csv files")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if args.replot:
        for path in args.replot:
            rows.extend(csv.DictReader(path.open()))
    for seed in [] if args.replot else args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            base = ROOT / "configs/digits/baseline.yaml"
            run_cli(["fit", "--config", str(base), "--seed_everything", str(seed)], Path(tmp))
            baseline = accuracy_on_test(base, Path(tmp) / "outputs/digits/baseline/last.ckpt", Path(tmp))
        for amplitude in args.amplitudes:
            with tempfile.TemporaryDirectory() as tmp:
                rows.append({"baseline_accuracy": baseline, **measure(amplitude, seed, args, Path(tmp))})
            print(f"# {rows[-1]}", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: (float(r["amplitude"]), int(r["seed"])))
    with open(args.out / "frontier.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "frontier.png")
    print(table(rows))


if __name__ == "__main__":
    main()
