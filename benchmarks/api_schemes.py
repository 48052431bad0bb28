"""DAWN against CSP's served head on the same students: one model served to customer alice through each API, a
student extracted through it by each extraction attack, and every student verified with every customer's key
(alice's and bob's), so each scheme must name alice.

    python benchmarks/api_schemes.py --seed 0 --amplitude 0.2 --shares 0.005 0.05
    python benchmarks/api_schemes.py --dataset fashion_mnist --seed 0 --attacks distillation retraining

The model is ``configs/<dataset>/csp.yaml`` with nothing baked (``embed: null``): its fit makes the CSP key of alice
and bob, and the trained weights are the unmarked model both APIs serve. Each customer gets a DAWN key of its own; bob
queries his endpoint with the validation split, so his log holds inputs the students never saw answered his way.
Students (SmallCNN width 32, ``--epochs``: 20 on digits, the config's 10 on Fashion-MNIST; the attacker's split
unless said): distillation of the served probabilities at T = 3, retraining on the served top-1 labels, and Knockoff
Nets (random selection of 5,000 sample photo patches, probabilities). Prints one Markdown row per API × attack:
the API's test accuracy against the model's, the student's accuracy, the queries it made and the watermark queries
among them, and the verdict (p-value over both customers, Bonferroni, and the customer named).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from config_costs import run_cli, top1_accuracy

if TYPE_CHECKING:
    from lightning_wm.data.base import SplitDataModule
    from lightning_wm.watermarks.csp import CSPKey

ROOT = Path(__file__).resolve().parent.parent


def _victim(dataset: str, seed: int, amplitude: float | None, cwd: Path) -> tuple[torch.nn.Module, CSPKey]:
    from lightning_wm import ImageClassifier
    from lightning_wm.verify import load_key

    config = str(ROOT / f"configs/{dataset}/csp.yaml")
    options = ["--seed_everything", str(seed), "--watermarks.csp.init_args.embed=null"]
    if amplitude is not None:
        options.append(f"--watermarks.csp.init_args.signal.amplitude={amplitude}")
    run_cli(["fit", "--config", config, *options], cwd)
    checkpoint = cwd / f"outputs/{dataset}/csp/last.ckpt"
    model = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    return model, load_key(cwd / f"outputs/{dataset}/csp.key")


def _datamodule(dataset: str, data_dir: Path, **kwargs) -> SplitDataModule:
    """The dataset's module: digits (bundled), or Fashion-MNIST from ``data_dir`` (copied from Debian's package)."""
    from lightning_wm.data import DigitsDataModule, FashionMNISTDataModule

    if dataset == "digits":
        return DigitsDataModule(batch_size=64, **kwargs)
    data = FashionMNISTDataModule(data_dir=str(data_dir), download=False, batch_size=128, **kwargs)
    data.prepare_data()
    return data


def _student(
    attack_name: str, api: torch.nn.Module, seed: int, data: SplitDataModule, epochs: int
) -> tuple[torch.nn.Module, int]:
    import lightning as L

    from lightning_wm.attacks import DistillationAttack, KnockoffAttack, RetrainingAttack
    from lightning_wm.benchmark.matrix import quiet_trainer
    from lightning_wm.models import SmallCNN

    L.seed_everything(seed, verbose=False)
    student = SmallCNN(1, 10, 32)
    if attack_name == "distillation":
        attack = DistillationAttack(api, student=student, temperature=3.0, output="probs")
    elif attack_name == "retraining":
        attack = RetrainingAttack(api, student=student)
    else:
        attack = KnockoffAttack(api, student=student, transfer_set="photos", transfer_size=5000, seed=seed)
    quiet_trainer({"accelerator": "cpu"}, epochs, [], limit_val_batches=0).fit(attack, data)
    return attack.eval(), attack.queries


def main() -> None:
    from lightning_wm.verify.derive import seed_secret
    from lightning_wm.verify.stats import queries_to_significance
    from lightning_wm.watermarks.dawn import DAWNHead, build_key

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "fashion_mnist"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: digits 20, Fashion 10)")
    parser.add_argument("--amplitude", type=float, default=None, help="CSP's ε (default: the config's)")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.005, 0.05])
    parser.add_argument("--attacks", nargs="+", default=["distillation", "retraining", "knockoff"])
    args = parser.parse_args()
    epochs = args.epochs or (20 if args.dataset == "digits" else 10)
    tmp = tempfile.TemporaryDirectory()
    data = _datamodule(args.dataset, Path(tmp.name) / "data")
    attacker_data = _datamodule(args.dataset, Path(tmp.name) / "data", train_split="attacker")
    data.setup("fit")
    x_test, y_test = data.dataset("test").tensors[:2]
    x_val = data.dataset("val").tensors[0]
    model, csp = _victim(args.dataset, args.seed, args.amplitude, Path(tmp.name))
    plain = top1_accuracy(model, x_test, y_test)
    print(f"model test accuracy {plain:.2f} (seed {args.seed})")
    print("| API | attack | API acc (model's) | student acc | queries (watermark) | p, both customers | named |")
    print("|---|---|---|---|---|---|---|")
    for api_name in ["csp", *(f"dawn {share:g}" for share in args.shares)]:
        for attack_name in args.attacks:
            if api_name == "csp":
                api = csp.serve(model, "alice")
                keys = None
            else:
                share = float(api_name.split()[1])
                keys = {
                    name: build_key(seed_secret(1000 * args.seed + i), share, 10, data, probes=200)
                    for i, name in enumerate(["alice", "bob"])
                }
                keys["bob"].serve(model)(x_val)
                api = keys["alice"].serve(model)
            unlogged = api if keys is None else DAWNHead(model, keys["alice"], record=False)
            served = top1_accuracy(unlogged, x_test, y_test)
            student, queries = _student(attack_name, api, args.seed, attacker_data, epochs)
            accuracy = top1_accuracy(student, x_test, y_test)
            if keys is None:
                verdict = csp.verify(student)
                named, p = verdict.details["customer"], verdict.p_value
                marks = "–"
                extra = f"corr {verdict.statistic:.3f}, {verdict.queries} verification queries"
            else:
                verdicts = {name: key.verify(student) for name, key in keys.items() if len(key.tensors["labels"])}
                best = min(verdicts, key=lambda n: verdicts[n].p_value)
                p = min(1.0, len(keys) * verdicts[best].p_value) if "alice" in verdicts else 1.0
                named = best if p < 0.01 and not verdicts[best].is_undecidable else None
                logged = len(keys["alice"].tensors["labels"])
                marks = str(logged)
                rate = verdicts["alice"].statistic if "alice" in verdicts else 0.0
                needed = queries_to_significance(rate, 1 / 9, alpha=1e-6) if logged else -1
                extra = f"agreement {rate:.2f} on {logged}; {needed} watermark queries to 1e-6"
            print(
                f"| {api_name} | {attack_name} | {served:.2f} ({plain:.2f}) | {accuracy:.2f} | {queries} ({marks}) | "
                f"{p:.2g} ({extra}) | {named} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
