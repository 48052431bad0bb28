"""The shipped configs against their baseline: test accuracy of ``configs/<dataset>/<name>.yaml`` and of
``baseline.yaml`` at the same seeds, and the final model's verdict, through the README's own commands.

    python benchmarks/config_costs.py --dataset digits --seeds 0 1 2 --configs uchida content ewe

For each seed it runs, in a fresh working directory, ``lightning-wm fit`` of the baseline, then ``fit``,
``test`` and ``verify`` of each config (a config with ``pretrained`` or ``teacher`` reads that seed's baseline, as the
config's comment says), with ``--seed_everything`` set, and prints one Markdown row per config: accuracy per
seed, mean minus the baseline's mean, and how many final models were declared (with the largest p-value). Extra
``lightning-wm fit`` options for every config go after ``--``.

A Fashion-MNIST fit takes minutes on a CPU, so a table can be gathered over several runs: with ``--results FILE``
every measured row is added to that JSON file as it finishes, and a row already there (same dataset, config,
seed, config text, baseline text and extra options) is read back instead of rerun; with ``--workdir DIR`` the
fits of seed S stay in ``DIR/seed-S``, where configs that fine-tune the baseline find its checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], cwd: Path) -> str:
    """``lightning-wm ARGS`` in ``cwd`` without its progress bar; its stdout, or an error with its stderr's tail."""
    done = subprocess.run(
        ["lightning-wm", *args, "--trainer.enable_progress_bar=false"], cwd=cwd, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"lightning-wm {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def accuracy_on_test(config: Path, ckpt: Path, cwd: Path) -> float:
    """Test accuracy in % of ``ckpt`` under ``config``, as ``lightning-wm test`` prints it."""
    out = run_cli(["test", "--config", str(config), "--ckpt_path", str(ckpt)], cwd)
    return 100 * float(re.search(r"test/acc\s+([0-9.]+)", out).group(1))


def top1_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in % of ``model`` on ``(x, y)``, in process (for models the CLI's ``test`` cannot load)."""
    with torch.no_grad():
        return 100 * float((model(x).argmax(-1) == y).float().mean())


def _checkpoint(config: dict, cwd: Path) -> Path:
    for callback in config["trainer"].get("callbacks", []):
        if callback["class_path"].endswith("ModelCheckpoint"):
            return cwd / callback["init_args"]["dirpath"] / "last.ckpt"
    raise ValueError("the config has no ModelCheckpoint")


def _outputs(config: dict) -> list[str]:
    """The paths a fit of ``config`` writes to and reads back: its checkpoint folder and its key files."""
    keys = [scheme["init_args"]["key_path"] for scheme in (config.get("watermarks") or {}).values()]
    return [str(_checkpoint(config, Path("."))), *keys]


def _check_distinct_outputs(configs: Path, names: list[str]) -> None:
    """Refuse configs that share a checkpoint folder or a key file: in one working directory the second fit would
    take up the first one's key, and ``test`` would read the first one's ``last.ckpt``."""
    owners: dict[str, str] = {}
    for name in names:
        for path in _outputs(yaml.safe_load((configs / f"{name}.yaml").read_text())):
            if path in owners:
                raise SystemExit(f"config_costs: {name} and {owners[path]} both write {path}: give each its own")
            owners[path] = name


def measure(configs: Path, name: str, seed: int, cwd: Path, extra: list[str]) -> dict:
    """Fit, test and verify ``configs/<name>.yaml`` at one seed in ``cwd``; returns test accuracy and verdict."""
    path = configs / f"{name}.yaml"
    config = yaml.safe_load(path.read_text())
    common = ["--config", str(path), "--seed_everything", str(seed)]
    checkpoint, *keys = _outputs(config)
    shutil.rmtree(cwd / Path(checkpoint).parent, ignore_errors=True)  # a fresh fit, from a fresh key:
    for key in keys:  # an earlier run's key file left in ``cwd`` would be taken up, not redrawn
        (cwd / key).unlink(missing_ok=True)
    run_cli(["fit", *common, *(extra if name != "baseline" else [])], cwd)
    ckpt = _checkpoint(config, cwd)
    row = {"acc": accuracy_on_test(path, ckpt, cwd)}
    for scheme in (config.get("watermarks") or {}).values():
        key = cwd / scheme["init_args"]["key_path"]
        printed = run_cli(["verify", "--config", str(path), "--key", str(key), "--ckpt_path", str(ckpt)], cwd)
        verdict = json.loads(printed.strip().splitlines()[-1])
        row |= {"declared": verdict["is_watermarked"], "p": verdict["p_value"], "statistic": verdict["statistic"]}
    return row


def row_key(configs: Path, dataset: str, name: str, seed: int, extra: list[str]) -> str:
    """What a measured row depends on: the config's and the baseline's text, the seed and the extra options."""
    texts = [(configs / f"{n}.yaml").read_text() for n in (name, "baseline")]
    digest = hashlib.sha256(json.dumps([texts, extra if name != "baseline" else []]).encode()).hexdigest()[:16]
    return f"{dataset}/{name}/seed-{seed}/{digest}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "fashion_mnist"])
    parser.add_argument(
        "--config-dir", type=Path, default=None, help="a folder of variant configs (default: configs/<dataset>)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--results", type=Path, default=None, help="JSON file of measured rows, reused and extended")
    parser.add_argument("--workdir", type=Path, default=None, help="keep each seed's fits in DIR/seed-S")
    parser.add_argument("--cached-only", action="store_true", help="print the table of the --results rows, fit none")
    parser.add_argument("extra", nargs="*", help="options added to every config's fit (after --)")
    args = parser.parse_args()
    configs = (args.config_dir or ROOT / "configs" / args.dataset).resolve()
    results: dict[str, dict[int, dict]] = {name: {} for name in ["baseline", *args.configs]}
    _check_distinct_outputs(configs, list(results))
    stored: dict[str, dict] = json.loads(args.results.read_text()) if args.results and args.results.exists() else {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            cwd = (args.workdir / f"seed-{seed}") if args.workdir else Path(tmp)
            cwd.mkdir(parents=True, exist_ok=True)
            for name in results:
                key = row_key(configs, args.dataset, name, seed, args.extra)
                if key in stored:
                    results[name][seed] = stored[key]
                    continue
                if args.cached_only:
                    continue
                needs_baseline = re.search(r"^\s*(pretrained|teacher):", (configs / f"{name}.yaml").read_text(), re.M)
                if (
                    needs_baseline
                    and not _checkpoint(yaml.safe_load((configs / "baseline.yaml").read_text()), cwd).exists()
                ):
                    measure(configs, "baseline", seed, cwd, args.extra)
                results[name][seed] = stored[key] = measure(configs, name, seed, cwd, args.extra)
                print(f"# {name} seed {seed}: {results[name][seed]}", file=sys.stderr, flush=True)
                if args.results:
                    args.results.parent.mkdir(parents=True, exist_ok=True)
                    args.results.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    print_table(results, args.seeds)


def print_table(results: dict[str, dict[int, dict]], seeds: list[int]) -> None:
    """One Markdown row per config: accuracy per seed ("–" where not measured), the mean over the measured seeds of
    accuracy minus the baseline's of the same seed, and the verdicts."""
    base = results["baseline"]
    print("| config | " + " | ".join(f"seed {s}" for s in seeds) + " | mean − baseline | declared |")
    print("|---|" + "---|" * (len(seeds) + 2))
    for name, rows in results.items():
        accs = [f"{rows[s]['acc']:.2f}" if s in rows else "–" for s in seeds]
        paired = [rows[s]["acc"] - base[s]["acc"] for s in seeds if s in rows and s in base]
        delta = "–" if name == "baseline" or not paired else f"{sum(paired) / len(paired):+.2f}"
        declared = [r for r in rows.values() if "declared" in r]
        verdicts = (
            f"{sum(r['declared'] for r in declared)}/{len(declared)} (largest p {max(r['p'] for r in declared):.2g})"
            if declared
            else "–"
        )
        print(f"| {name} | " + " | ".join(accs) + f" | {delta} | {verdicts} |")


if __name__ == "__main__":
    main()
