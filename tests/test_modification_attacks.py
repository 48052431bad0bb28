"""The SoK's model-modification attacks (Lukas et al., S&P 2022) on a digits SmallCNN carrying both an Uchida mark
(white-box, conv2) and a content trigger set (black-box): each does to the weights or the labels what its paper
says, at an accuracy cost within a bound measured here (figures printed with ``-s``)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import fast_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_wm import ImageClassifier, registry
from lightning_wm.attacks import (
    FinePruningAttack,
    LabelNoiseAttack,
    LabelSmoothingAttack,
    RegularizationAttack,
    WeightQuantizationAttack,
    WeightShiftingAttack,
)
from lightning_wm.attacks.label_smoothing import noisy_labels
from lightning_wm.attacks.quantization import quantize
from lightning_wm.attacks.weight_shifting import shifted_modules
from lightning_wm.cli import main
from lightning_wm.data import DigitsDataModule
from lightning_wm.models import SmallCNN
from lightning_wm.verify import load_key

pytestmark = pytest.mark.usefixtures("one_thread")

SGD = partial(torch.optim.SGD, lr=0.01, momentum=0.9)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]
NAMES = ["weight_shifting", "fine_pruning", "weight_quantization", "label_smoothing", "label_noise", "regularization"]


@pytest.fixture(scope="module")
def victim(one_thread):
    """A width-16 SmallCNN marked by the registry's Uchida and content examples in one fit, its two keys and its
    test accuracy."""
    uchida = registry.scheme("uchida").example(seed=3)
    content = registry.scheme("content").example(seed=4)
    L.seed_everything(0)
    model = ImageClassifier(SmallCNN(1, 10, 16), num_classes=10, optimizer=partial(torch.optim.Adam, lr=2e-3))
    fast_trainer(8, [uchida, content]).fit(model, DigitsDataModule(batch_size=64))
    model.eval()
    assert uchida.key.verify(model).is_watermarked
    assert content.key.verify(model).is_watermarked
    return model, uchida.key, content.key, _accuracy(model)


@pytest.fixture(scope="module")
def attacker_data():
    return DigitsDataModule(batch_size=64, train_split="attacker")


def _accuracy(model: nn.Module) -> float:
    dm = DigitsDataModule(batch_size=512)
    dm.setup("test")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        hits = [(model(x).argmax(-1) == y).float() for x, y in dm.test_dataloader()]
    model.train(was_training)
    return float(torch.cat(hits).mean())


def _report(name: str, attack: nn.Module, victim) -> float:
    """Print the attacked model's accuracy cost, Uchida's BER and the content key's accuracy (with whether each is
    still declared at α = 0.01); return the cost."""
    _, uchida_key, content_key, clean = victim
    acc = _accuracy(attack)
    ber = uchida_key.verify(attack.eval())
    keys = content_key.verify(attack.eval())
    print(
        f"\n{name}: acc {clean:.3f} -> {acc:.3f} (cost {clean - acc:+.3f}), "
        f"BER {ber.statistic:.3f} ({'kept' if ber.is_watermarked else 'removed'}), "
        f"key acc {keys.statistic:.3f} ({'kept' if keys.is_watermarked else 'removed'})"
    )
    return clean - acc


def test_weight_shifting_moves_each_conv_filter_by_the_stated_amount(victim, attacker_data):
    model = victim[0]
    original = {name: m.weight.detach().clone() for name, m in shifted_modules(model.backbone)}
    exact = WeightShiftingAttack(model, shift=1.5, noise=0.0)
    for name, module in shifted_modules(exact.model):
        torch.testing.assert_close(module.weight, original[name] - 1.5 * original[name].mean(0))
    assert torch.equal(exact.model.head.weight, model.backbone.head.weight), "linear layers move only with 'all'"
    assert not torch.equal(WeightShiftingAttack(model, layers="all").model.head.weight, model.backbone.head.weight)

    L.seed_everything(0)
    attack = WeightShiftingAttack(model, shift=1.5, noise=1.0, optimizer=SGD)
    for name, module in shifted_modules(attack.model):
        residual = module.weight - (original[name] - 1.5 * original[name].mean(0))
        assert abs(float(residual.std() / original[name].std()) - 1.0) < 0.15
        assert abs(float(residual.mean() / original[name].std())) < 0.15
    shifted = _accuracy(attack)
    fast_trainer(5).fit(attack, attacker_data)
    print(f"\nweight shifting: acc right after the shift {shifted:.3f}")
    assert _report("weight_shifting (1.5, 1.0, 5 epochs)", attack, victim) < 0.04
    assert victim[1].verify(attack.eval()).statistic > 0.9, (
        "shift 1.5 flips the mean filter: Uchida reads ~every bit inverted"
    )


def test_fine_pruning_zeroes_the_least_active_channels_of_the_last_conv(victim, attacker_data):
    model = victim[0]
    attack = FinePruningAttack(model, rate=0.75, optimizer=SGD)
    assert (attack.layer, attack._measured()) == ("conv3", attack.model.bn3)
    attacker_data.setup("fit")
    activations = attack.channel_activations(attacker_data.train_dataloader())
    assert activations.shape == (32,)
    fast_trainer(5).fit(attack, attacker_data)

    expected = sorted(activations.argsort()[:24].tolist())
    assert attack.pruned == expected
    conv = attack.model.conv3
    assert not hasattr(conv, "weight_orig"), "the pruning is permanent when fit ends"
    assert torch.all(conv.weight[expected] == 0)
    assert torch.all(conv.bias[expected] == 0)
    kept = [c for c in range(32) if c not in expected]
    assert torch.all(conv.weight[kept].abs().flatten(1).sum(1) > 0)
    assert all(activations[c] <= activations[k] for c in expected for k in kept)
    assert _report("fine_pruning (75% of conv3, 5 epochs)", attack, victim) < 0.08

    untrained = FinePruningAttack(model, rate=0.75)
    fast_trainer().test(untrained, datamodule=attacker_data, verbose=False)
    assert untrained.pruned == expected, "test without fit prunes on the datamodule's training split"
    assert torch.all(untrained.model.conv3.weight[expected] == 0)


def test_weight_quantization_leaves_at_most_two_to_the_bits_values(victim, attacker_data):
    weight = torch.randn(64, 32)
    assert len(torch.unique(quantize(weight, 3))) <= 8
    assert (quantize(weight, 3) - weight).abs().max() <= (weight.max() - weight.min()) / 7 / 2 + 1e-6
    model = victim[0]
    for bits in (5, 3):
        attack = WeightQuantizationAttack(model, bits=bits)
        for w in attack.quantized_weights():
            assert len(torch.unique(w)) <= 2**bits
        cost = _report(f"weight_quantization ({bits} bits, no fine-tuning)", attack, victim)
        assert cost < (0.02 if bits == 5 else 0.25), "3 bits cost 0.13 to 0.17 of the same victim, by CPU kernels"
    tuned = WeightQuantizationAttack(model, bits=3, optimizer=SGD)
    fast_trainer(1).fit(tuned, attacker_data)
    assert all(len(torch.unique(w)) <= 8 for w in tuned.quantized_weights()), "fit ends with the weights quantized"
    assert _report("weight_quantization (3 bits, 1 epoch, requantized)", tuned, victim) < 0.15


def test_label_noise_replaces_the_stated_share_of_labels():
    y = torch.arange(10).repeat(100)
    g = torch.Generator().manual_seed(0)
    changed = torch.stack([noisy_labels(y, 0.3, 10, generator=g) != y for _ in range(200)]).float()
    assert changed.sum(1).max() <= 300, "at most round(0.3 · 1000) labels are replaced"
    assert abs(float(changed.mean()) - 0.3 * 0.9) < 0.01, "a replaced label is uniform, so 1 in 10 stays"
    assert torch.equal(noisy_labels(y, 0.0, 10), y)
    assert (noisy_labels(y, 1.0, 3) < 3).all()


def test_label_smoothing_trains_on_the_smoothed_target(victim):
    attack = LabelSmoothingAttack(victim[0], label_smoothing=0.3)
    logits = torch.randn(8, 10)
    y = torch.randint(10, (8,))
    target = torch.full((8, 10), 0.03).scatter(1, y[:, None], 0.73)
    expected = -(target * F.log_softmax(logits, -1)).sum(1).mean()
    torch.testing.assert_close(F.cross_entropy(logits, attack.targets(y, 10), label_smoothing=0.3), expected)
    assert torch.equal(attack.targets(y, 10), y), "no label noise by default"
    noisy = LabelNoiseAttack(victim[0])
    assert (noisy.label_noise, noisy.label_smoothing) == (0.3, 0.0)
    assert noisy.hparams["label_noise"] == 0.3


@pytest.mark.parametrize(
    ("name", "make", "bound"),
    [
        (
            "label_smoothing (0.3, 5 epochs)",
            lambda m: LabelSmoothingAttack(m, label_smoothing=0.3, optimizer=SGD),
            0.05,
        ),
        ("label_noise (0.3, 5 epochs)", lambda m: LabelNoiseAttack(m, label_noise=0.3, optimizer=SGD), 0.08),
    ],
)
def test_label_attacks_cost_little_accuracy(name, make, bound, victim, attacker_data):
    L.seed_everything(0)
    attack = make(victim[0])
    fast_trainer(5).fit(attack, attacker_data)
    assert _report(name, attack, victim) < bound


class _Record(Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        decay = pl_module.optimizers().param_groups[0]["weight_decay"]
        self.rows.append((decay, pl_module.weight_norm, _accuracy(pl_module)))


def test_regularization_shrinks_the_weights_then_recovery_restores_accuracy(victim, attacker_data):
    model = victim[0]
    attack = RegularizationAttack(model, weight_decay=0.1, reg_epochs=3, optimizer=partial(SGD, lr=0.02))
    before = attack.weight_norm
    record = _Record()
    fast_trainer(9, [record]).fit(attack, attacker_data)
    decays, norms, accs = zip(*record.rows)
    print(f"\nregularization: norm {before:.1f} -> {[round(n, 1) for n in norms]}, acc {[round(a, 3) for a in accs]}")
    assert decays == (0.1,) * 3 + (0.0,) * 6
    assert norms[2] < 0.85 * before
    assert abs(norms[-1] - norms[-3]) < 0.05 * before, "without the decay the norm stops shrinking"
    assert accs[-1] >= min(accs[:3]), "the recovery phase wins back what the L2 phase lost"
    assert _report("regularization (0.1 for 3 epochs, 6 recovery epochs)", attack, victim) < 0.03


@pytest.fixture(scope="module")
def cli_victim(tmp_path_factory, one_thread):
    """A checkpoint and key written by ``lightning-wm fit --config configs/digits/uchida.yaml`` (3 epochs)."""
    root = tmp_path_factory.mktemp("cli_victim")
    config = yaml.safe_load((CONFIGS / "digits" / "uchida.yaml").read_text())
    config["trainer"].update(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False)
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(root)
    config["watermarks"]["uchida"]["init_args"]["key_path"] = str(root / "owner.key")
    path = root / "victim.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    return root / "last.ckpt", load_key(root / "owner.key")


@pytest.mark.parametrize("name", NAMES)
def test_each_attack_runs_from_its_config(name, cli_victim, tmp_path, monkeypatch):
    victim, key = cli_victim
    monkeypatch.chdir(tmp_path)
    epochs = ["--model.init_args.reg_epochs=1", "--trainer.max_epochs=2"] if name == "regularization" else []
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "attacks" / f"{name}.yaml"),
            f"--model.init_args.victim={victim}",
            "--trainer.max_epochs=1",
            *epochs,
            *FAST,
        ]
    )
    checkpoint = Path(f"outputs/digits/attacks/{name}/last.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert {k.split(".")[0] for k in state["state_dict"]} == {"model"}
    assert not any(k.endswith(("_orig", "_mask")) for k in state["state_dict"]), "pruning is permanent"
    assert state["attack_cost"]["epochs"] == (2 if name == "regularization" else 1)
