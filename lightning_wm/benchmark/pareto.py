"""The search's reports: per scheme a Pareto plot of every trial (accuracy against the normalised statistic), the
"strongest attack within budget" table (``strongest.md``/``strongest.csv``), every tuned attack's chosen setting
(``search.csv``), and the same in W&B."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

from lightning_wm.benchmark.search import strongest_per_scheme

COLUMNS = (
    "mode",
    "scheme",
    "attack",
    "params",
    "status",
    "acc_before",
    "acc",
    "acc_drop",
    "statistic_name",
    "statistic",
    "threshold",
    "normalised",
    "p_value",
    "tuned_value",
    "tuned_acc_drop",
    "tuned_status",
    "trial",
    "tuned_key",
    "owner_key",
    "reason",
)
"""``normalised``, ``statistic``, ``p_value`` and ``status`` are the owner's verdict of the chosen setting;
``tuned_*`` is what the attacker tuned on (the same in oracle mode, its proxy's otherwise)."""


def format_params(params: dict[str, Any]) -> str:
    """``lr=0.00123, optimizer=adam, epochs=3``."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "params": format_params(row.get("params", {}))}


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(_flat(r) for r in rows)
    return path


def strongest_table(rows: list[dict[str, Any]]) -> str:
    """The strongest attack within the budget per attacker and scheme, with the owner's verdict of it."""
    lines = [
        "| attacker | scheme | best attack | parameters | test acc % (before → after) | accuracy loss (points) | "
        "statistic (normalised) | p-value | outcome |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in strongest_per_scheme(rows):
        head = f"| {row['mode']} | {row['scheme']} | {row['attack']} | {format_params(row['params'])} |"
        if "statistic" not in row:
            lines.append(f"{head} – | – | – | – | {row['status']} ({row.get('reason', '')[:80]}) |")
            continue
        statistic = f"{row['statistic_name']} {row['statistic']:.3f} ({row['normalised']:.2f})"
        p_value = "<1e-300" if row["p_value"] < 1e-300 else f"{row['p_value']:.2g}"
        lines.append(
            f"{head} {100 * row['acc_before']:.1f} → {100 * row['acc']:.1f} | {row['acc_drop']:.1f} | {statistic} | "
            f"{p_value} | {row['status']} |"
        )
    return "\n".join(lines)


def pareto_plot(rows: list[dict[str, Any]], scheme: str, budget: float, path: Path) -> Path:
    """Every trial of ``scheme``'s studies, one panel per attacker: test accuracy against the normalised statistic
    (the attacker's view), the decision threshold (0.5) and the budget line; the chosen setting of each attack is
    circled, and in proxy mode the owner's verdict of it is a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["scheme"] == scheme]
    modes = list(dict.fromkeys(r["mode"] for r in mine))
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.2), squeeze=False, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, mode in zip(axes[0], modes, strict=True):
        before = None
        for i, row in enumerate(r for r in mine if r["mode"] == mode):
            colour = colours[i % len(colours)]
            trials = [t for t in row.get("trials", []) if "normalised" in t]
            if trials:
                before = trials[0]["acc_before"]
                ax.scatter(
                    [t["normalised"] for t in trials],
                    [100 * t["acc"] for t in trials],
                    s=18,
                    alpha=0.6,
                    color=colour,
                    label=row["attack"],
                )
                chosen = next((t for t in trials if t["number"] == row.get("trial")), None)
                if chosen is not None:
                    ax.scatter(chosen["normalised"], 100 * chosen["acc"], s=120, facecolors="none", edgecolors=colour)
            if mode == "proxy" and "normalised" in row:
                ax.scatter(row["normalised"], 100 * row["acc"], marker="x", s=70, color=colour)
        ax.axvline(0.5, color="black", linestyle="--", linewidth=1, label="decision threshold")
        if before is not None:
            budget_line = f"budget (−{budget:g} pt)" if mode == "oracle" else f"proxy's budget (−{budget:g} pt)"
            ax.axhline(100 * before - budget, color="grey", linestyle=":", linewidth=1, label=budget_line)
        owner_before = next((r["acc_before"] for r in mine if r["mode"] == mode and "acc_before" in r), None)
        if mode == "proxy" and owner_before is not None:
            line = 100 * owner_before - budget
            ax.axhline(line, color="black", linestyle="-.", linewidth=1, label=f"owner's budget (−{budget:g} pt)")
        view = "owner's key" if mode == "oracle" else "proxy key; × owner's verdict of the choice"
        ax.set_xlabel(f"normalised statistic ({view})")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"{scheme}: {mode} attacker")
        ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_search_reports(
    rows: list[dict[str, Any]], output_dir: str | Path, budget: float, logger: Any = None
) -> dict[str, Path]:
    """Write ``strongest.md``, ``strongest.csv``, ``search.csv`` and ``pareto_<scheme>.png`` under ``output_dir``;
    log the table, the plots and a ``search-report`` artifact when ``logger`` is a ``WandbLogger``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    strongest = strongest_per_scheme(rows)
    paths = {
        "strongest_csv": write_csv(strongest, output_dir / "strongest.csv"),
        "search_csv": write_csv(rows, output_dir / "search.csv"),
        "strongest_md": output_dir / "strongest.md",
    }
    paths["strongest_md"].write_text(strongest_table(rows) + "\n")
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "-", scheme)
        paths[f"pareto_{scheme}"] = pareto_plot(rows, scheme, budget, output_dir / f"pareto_{safe}.png")
    if logger is not None:
        from lightning.pytorch.loggers import WandbLogger

        if isinstance(logger, WandbLogger):
            log_search_to_wandb(logger, strongest, paths)
    return paths


def log_search_to_wandb(logger: Any, strongest: list[dict[str, Any]], paths: dict[str, Path]) -> None:
    """``search/strongest`` (a table), ``search/pareto/<scheme>`` (images) and a ``search-report`` artifact."""
    import wandb

    run = logger.experiment
    data = [[_wandb_value(_flat(r).get(c)) for c in COLUMNS] for r in strongest]
    images = {
        f"search/pareto/{name.removeprefix('pareto_')}": wandb.Image(str(path))
        for name, path in paths.items()
        if name.startswith("pareto_")
    }
    run.log({"search/strongest": wandb.Table(columns=list(COLUMNS), data=data), **images})
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"search-report-{getattr(run, 'group', None) or 'benchmark'}")
    artifact = wandb.Artifact(name, type="search-report", metadata={"rows": len(strongest)})
    for path in paths.values():
        artifact.add_file(str(path), name=path.name)
    run.log_artifact(artifact)


def _wandb_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
