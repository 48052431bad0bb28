"""The benchmark's outputs: CSV, Markdown table, heatmap PNG, and the same table and plot in W&B."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

COLUMNS = (
    "scheme",
    "attack",
    "category",
    "status",
    "baseline_acc",
    "acc_before",
    "acc_after",
    "acc_drop",
    "statistic_name",
    "statistic",
    "p_value",
    "empirical_p",
    "watermarked",
    "false_positives",
    "fp_clean",
    "fp_other_schemes",
    "fp_untrained",
    "fp_collapsed",
    "queries",
    "attack_time",
    "key_fingerprint",
    "reason",
)

STATUS_COLOURS = {
    "kept": "#2e7d32",
    "removed": "#c62828",
    "removed, over budget": "#f9a825",
    "not embedded": "#6a1b9a",
    "undecidable": "#1565c0",
    "n/a": "#bdbdbd",
    "error": "#000000",
}
"""Green: the watermark survives; red: removed within the accuracy budget; amber: removed at too high an
accuracy cost; purple: the marked model itself is not declared (embedding failed); blue: the attacked model is
degenerate, so its verdict is undecidable; grey: the attack does not apply; black: the cell failed (see its log)."""


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the benchmark rows as CSV (the columns of ``COLUMNS``); the parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def format_p(p_value: float) -> str:
    """``=3e-05``, or ``<1e-300`` where the p-value underflows double precision."""
    return "<1e-300" if p_value < 1e-300 else f"={p_value:.0e}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per scheme × attack: accuracy before/after (%), the statistic, the p-value, the outcome, and the
    key's false accusations among the benchmark's innocent models (clean / other schemes' / untrained / collapsed,
    declared/tried)."""
    header = (
        "| scheme | attack | test acc % (before → after) | statistic | p-value | outcome | "
        "FP (clean / other / untrained / collapsed) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for row in rows:
        accuracy = f"{_pct(row['acc_before'])} → {_pct(row.get('acc_after', math.nan))}"
        statistic = "–"
        if "statistic" in row and not math.isnan(float(row["statistic"])):
            statistic = f"{row['statistic_name']} {row['statistic']:.3f}"
        outcome = row["status"]
        if row.get("reason"):
            outcome = f"{outcome} ({row['reason'][:80]})"
        counts = " / ".join(
            str(row.get(f"fp_{kind}", "–")) for kind in ("clean", "other_schemes", "untrained", "collapsed")
        )
        lines.append(
            f"| {row['scheme']} | {row['attack']} | {accuracy} | {statistic} | {_fmt_p(row.get('p_value'))} | "
            f"{outcome} | {counts} |"
        )
    return "\n".join(lines)


def _pct(accuracy: float) -> str:
    return "–" if math.isnan(accuracy) else f"{100 * accuracy:.1f}"


def _fmt_p(p_value: float | None) -> str:
    if p_value is None or math.isnan(p_value):
        return "–"
    return "<1e-300" if p_value < 1e-300 else f"{p_value:.2g}"


def heatmap(rows: list[dict[str, Any]], path: str | Path, title: str = "watermark robustness") -> Path:
    """Schemes × attacks, coloured by outcome (see ``STATUS_COLOURS``), annotated with the accuracy drop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    cells = {(r["scheme"], r["attack"]): r for r in rows}
    image = [
        [to_rgb(STATUS_COLOURS.get(cells.get((s, a), {}).get("status", "n/a"), "#ffffff")) for a in attacks]
        for s in schemes
    ]
    fig, ax = plt.subplots(figsize=(1.3 * len(attacks) + 2, 0.6 * len(schemes) + 2.2), layout="constrained")
    ax.imshow(image, aspect="auto")
    for i, scheme in enumerate(schemes):
        for j, attack in enumerate(attacks):
            row = cells.get((scheme, attack), {})
            if row.get("status") in (None, "n/a", "error"):
                text = row.get("status") or "n/a"
            else:
                text = f"p{format_p(row['p_value'])}\n{-row['acc_drop']:+.1f} pt"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if row else "black")
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    ax.set_yticks(range(len(schemes)), schemes)
    ax.set_title(title)
    fig.legend(
        handles=[Patch(color=c, label=s) for s, c in STATUS_COLOURS.items()],
        loc="outside lower center",
        ncol=len(STATUS_COLOURS),
        fontsize=7,
        frameon=False,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_to_wandb(
    logger: Any, rows: list[dict[str, Any]], image: Path, summary: dict[str, Any], files: dict[str, Path] | None = None
) -> None:
    """Log the table (a ``wandb.Table``), the heatmap, the run's summary (key fingerprints, never keys; the count of
    cells by outcome under ``benchmark/status/<outcome>``) and ``files`` (results.csv, results.md, heatmap.png) as an
    artifact of type ``benchmark-report`` named after the run's group."""
    import wandb

    run = logger.experiment
    table = wandb.Table(columns=list(COLUMNS), data=[[_wandb_value(r.get(c)) for c in COLUMNS] for r in rows])
    logger.log_hyperparams(summary)
    run.log({"benchmark/table": table, "benchmark/heatmap": wandb.Image(str(image))})
    counts: dict[str, int] = {}
    for row in rows:
        counts[str(row.get("status"))] = counts.get(str(row.get("status")), 0) + 1
    run.summary.update({"benchmark/cells": len(rows), **{f"benchmark/status/{k}": n for k, n in counts.items()}})
    if files:
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"benchmark-report-{getattr(run, 'group', None) or 'benchmark'}")
        artifact = wandb.Artifact(name, type="benchmark-report", metadata={"cells": len(rows), **counts})
        for path in files.values():
            artifact.add_file(str(path), name=Path(path).name)
        run.log_artifact(artifact)


def _wandb_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


RADAR_CATEGORIES = ("input preprocessing", "model modification", "model extraction", "combined")
"""The SoK's families of removal attacks (Lukas et al., S&P 2022), one axis each of a scheme's radar plot."""


def removal_strength(
    row: dict[str, Any], baseline_p: float | None = None, alpha: float = 0.01, budget: float = 5.0
) -> float | None:
    """How far an attack went towards removing the watermark, in ``[0, 1]``; None for a cell over the accuracy
    budget, not applicable or failed.

    1 when removed (or undecidable: no longer accused) within the budget; for a kept watermark, the fraction of the
    decision threshold reached on the log10 p-value scale, from the marked model's ``baseline_p`` (0: the attack
    changed nothing) to ``alpha`` (1), or ``log α / log p`` without a baseline.
    """
    if row.get("status") in ("removed", "undecidable"):
        return 1.0
    if row.get("status") != "kept" or float(row.get("acc_drop", 0.0)) > budget:
        return None
    p_value = row.get("p_value")
    if p_value is None or (isinstance(p_value, float) and math.isnan(p_value)):
        return None
    log_p, log_alpha = math.log10(max(float(p_value), 1e-300)), math.log10(alpha)
    if baseline_p is not None and not math.isnan(baseline_p):
        log_base = math.log10(max(float(baseline_p), 1e-300))
        if log_base >= log_alpha:
            return 0.0
        return min(1.0, max(0.0, (log_base - log_p) / (log_base - log_alpha)))
    return min(1.0, max(0.0, log_alpha / log_p)) if log_p < 0 else 1.0


def attack_categories(rows: list[dict[str, Any]]) -> list[str]:
    """The ``RADAR_CATEGORIES``, then any other category the rows carry, in order of appearance."""
    extra = [c for c in dict.fromkeys(str(r.get("category") or "") for r in rows) if c and c not in RADAR_CATEGORIES]
    return [*RADAR_CATEGORIES, *extra]


def strongest_per_category(
    rows: list[dict[str, Any]], alpha: float = 0.01, budget: float = 5.0
) -> dict[str, dict[str, tuple[float, dict[str, Any]]]]:
    """Scheme → category → (strength, row) of the strongest attack of that category within the accuracy budget
    (:func:`removal_strength` against the scheme's unattacked row; ties go to the smaller accuracy loss).
    Categories with no attack within the budget are absent."""
    categories = attack_categories(rows)
    selection: dict[str, dict[str, tuple[float, dict[str, Any]]]] = {}
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        own = [r for r in rows if r["scheme"] == scheme]
        baseline = next((r.get("p_value") for r in own if r.get("attack") == "none"), None)
        best: dict[str, tuple[float, dict[str, Any]]] = {}
        for row in own:
            category = str(row.get("category") or "")
            strength = removal_strength(row, baseline, alpha, budget) if category in categories else None
            if strength is None:
                continue
            held = best.get(category)
            drop = float(row.get("acc_drop", math.inf))
            if (
                held is None
                or strength > held[0]
                or (strength == held[0] and drop < float(held[1].get("acc_drop", math.inf)))
            ):
                best[category] = (strength, row)
        selection[str(scheme)] = best
    return selection


def category_table(rows: list[dict[str, Any]], alpha: float = 0.01, budget: float = 5.0) -> str:
    """Markdown: per scheme, the strongest attack of each category within the budget, with its outcome and
    accuracy change (the SoK's per-category view, Lukas et al., S&P 2022)."""
    categories = attack_categories(rows)
    lines = ["| scheme | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
    for scheme, best in strongest_per_category(rows, alpha, budget).items():
        cells = []
        for category in categories:
            if category not in best:
                cells.append("none within budget")
                continue
            strength, row = best[category]
            outcome = row["status"] if row["status"] != "kept" else f"kept ({strength:.0%} of the way)"
            cells.append(f"{row['attack']}: {outcome}, {-float(row.get('acc_drop', math.nan)):+.1f} pts")
        lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def radar_plots(
    rows: list[dict[str, Any]], output_dir: str | Path, logger: Any = None, alpha: float = 0.01, budget: float = 5.0
) -> dict[str, Path]:
    """One ``radar_<scheme>.png`` per scheme under ``output_dir``: for each category of attack (the
    ``RADAR_CATEGORIES``, then any other in the rows) the strongest removal within the accuracy budget
    (:func:`strongest_per_category`), the vertex labelled with that attack; logged as ``benchmark/radar/<scheme>``
    images when ``logger`` is a ``WandbLogger``. Returns the paths by ``radar_<scheme>``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = attack_categories(rows)
    angles = [2 * math.pi * i / len(categories) for i in range(len(categories))]
    paths: dict[str, Path] = {}
    for scheme, chosen in strongest_per_category(rows, alpha, budget).items():
        best = {c: (strength, str(row["attack"])) for c, (strength, row) in chosen.items()}
        values = [best.get(c, (0.0, ""))[0] for c in categories]
        fig, ax = plt.subplots(figsize=(5, 5), subplot_kw={"projection": "polar"}, layout="constrained")
        ax.plot([*angles, angles[0]], [*values, values[0]], color="#c62828")
        ax.fill([*angles, angles[0]], [*values, values[0]], color="#c62828", alpha=0.25)
        ax.set_ylim(0, 1)
        ax.set_yticks([0.25, 0.5, 0.75, 1.0], ["", "", "", "removed"], fontsize=7)
        labels = [f"{c}\n{best[c][1]}" if c in best else f"{c}\n(none in budget)" for c in categories]
        ax.set_xticks(angles, labels, fontsize=8)
        ax.set_title(f"{scheme}: strongest removal per category", fontsize=10)
        path = Path(output_dir) / f"radar_{re.sub(r'[^A-Za-z0-9_.-]', '-', str(scheme))}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths[path.stem] = path
    if logger is not None and paths:
        from lightning.pytorch.loggers import WandbLogger

        if isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log(
                {f"benchmark/radar/{name.removeprefix('radar_')}": wandb.Image(str(p)) for name, p in paths.items()}
            )
    return paths


def write_reports(
    rows: list[dict[str, Any]], output_dir: str | Path, logger: Any = None, summary: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md``, ``heatmap.png``, ``strongest_per_category.md`` and the radar plots
    under ``output_dir``; log them to W&B (the table, the images and a ``benchmark-report`` artifact of every written
    file) when ``logger`` is a ``WandbLogger`` (any other logger receives the summary as hyperparameters)."""
    output_dir = Path(output_dir)
    paths = {
        "csv": write_csv(rows, output_dir / "results.csv"),
        "markdown": output_dir / "results.md",
        "heatmap": heatmap(rows, output_dir / "heatmap.png"),
    }
    paths["markdown"].write_text(markdown_table(rows) + "\n")
    alpha = float((summary or {}).get("alpha", 0.01))
    paths["categories"] = output_dir / "strongest_per_category.md"
    budget = float((summary or {}).get("accuracy_budget", 5.0))
    paths["categories"].write_text(category_table(rows, alpha, budget) + "\n")
    paths.update(radar_plots(rows, output_dir, logger, alpha=alpha, budget=budget))
    if logger is not None:
        from lightning.pytorch.loggers import WandbLogger

        if isinstance(logger, WandbLogger):
            log_to_wandb(logger, rows, paths["heatmap"], summary or {}, files=paths)
        else:
            logger.log_hyperparams(summary or {})
            logger.save()
    return paths
