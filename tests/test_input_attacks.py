"""Input-preprocessing attacks and ChainAttack on digits: each transform changes the queries as it should, its
accuracy cost is within the bounds measured on a width-8 SmallCNN (clean test accuracy 0.85 after 3 epochs),
black-box keys give verdicts through it while white-box keys do not apply, and a chain's cost is its parts'."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import Marked, fast_trainer

from lightning_wm import ImageClassifier, registry
from lightning_wm.attacks import (
    AutoencoderAttack,
    ChainAttack,
    DistillationAttack,
    FeatureSqueezingAttack,
    FineTuneAttack,
    FlipAttack,
    InputNoiseAttack,
    JpegAttack,
    OcclusionAttack,
    PruneAttack,
    QuantizationAttack,
    SmoothingAttack,
)
from lightning_wm.attacks import input_transform as T
from lightning_wm.data import DigitsDataModule
from lightning_wm.models import SmallCNN
from lightning_wm.verify import NotApplicable, Verdict

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_ATTACKS = (
    "jpeg",
    "input_quantization",
    "smoothing",
    "input_noise",
    "flip",
    "feature_squeezing",
    "occlusion",
    "autoencoder",
    "chain",
)


@pytest.fixture(scope="module")
def victim(dm: DigitsDataModule) -> ImageClassifier:
    L.seed_everything(0)
    model = ImageClassifier(SmallCNN(1, 10, 8), num_classes=10)
    fast_trainer(3, limit_val_batches=0).fit(model, dm)
    return model.eval()


@pytest.fixture(scope="module")
def stats(dm: DigitsDataModule) -> dict[str, list[float]]:
    return T.statistics(dm)


@pytest.fixture(scope="module")
def pixels(dm: DigitsDataModule) -> torch.Tensor:
    return dm.denormalize(dm.dataset("test").tensors[0][:64]).clamp(0, 1)


def _accuracy(module: L.LightningModule, dm: DigitsDataModule) -> float:
    L.seed_everything(0)
    (metrics,) = fast_trainer(1).test(module, datamodule=dm, verbose=False)
    return float(metrics["test/acc"])


# ---------------------------------------------------------------------------------------------------------------
# The pure transforms


def test_jpeg_changes_pixels_at_low_quality_and_barely_at_high(pixels: torch.Tensor) -> None:
    low, high = T.jpeg(pixels, 10), T.jpeg(pixels, 95)
    assert low.shape == pixels.shape
    assert (low - pixels).abs().mean() > 0.05
    assert (high - pixels).abs().mean() < 0.02
    assert torch.allclose(low * 255, (low * 255).round(), atol=1e-4), "decoded 8-bit pixels"


def test_quantization_to_one_bit_gives_two_levels_and_is_idempotent(pixels: torch.Tensor) -> None:
    assert T.quantize(pixels, 1).unique().tolist() == [0.0, 1.0]
    four = T.quantize(pixels, 4)
    assert len(four.unique()) <= 16
    assert torch.equal(T.quantize(four, 4), four)
    assert T.feature_squeeze(pixels, 1, 2).unique().tolist() == [0.0, 1.0]


def test_flip_is_an_involution_that_moves_pixels(pixels: torch.Tensor) -> None:
    flipped = T.horizontal_flip(pixels)
    assert not torch.equal(flipped, pixels)
    assert torch.equal(T.horizontal_flip(flipped), pixels)
    assert torch.equal(flipped[..., 0], pixels[..., -1])


def test_smoothing_filters_keep_constants_and_remove_a_lone_bright_pixel() -> None:
    constant = torch.full((2, 1, 8, 8), 0.3)
    spike = torch.zeros(1, 1, 8, 8)
    spike[0, 0, 4, 4] = 1.0
    for kernel in (2, 3):
        assert torch.allclose(T.median_blur(constant, kernel), constant)
        assert T.median_blur(spike, kernel).max() == 0
    assert torch.allclose(T.mean_blur(constant, 3), constant)
    assert torch.allclose(T.gaussian_blur(constant, 1.0), constant)
    assert T.mean_blur(spike, 3)[0, 0, 4, 4] == pytest.approx(1 / 9)
    assert 0 < T.gaussian_blur(spike, 1.0)[0, 0, 4, 4] < 0.5


def test_noise_and_occlusion_change_the_queries_as_set(pixels: torch.Tensor) -> None:
    torch.manual_seed(0)
    assert torch.equal(T.gaussian_noise(pixels, 0.0), pixels)
    noisy = T.gaussian_noise(pixels, 0.1)
    assert noisy.min() >= 0
    assert noisy.max() <= 1
    assert 0.05 < (noisy - pixels).std() < 0.1
    ones = torch.ones(16, 1, 8, 8)
    occluded = T.occlude(ones, 0.25, fill=0.0, generator=torch.Generator().manual_seed(0))
    assert ((occluded == 0).flatten(1).sum(1) == 4).all(), "one 2 × 2 patch per 8 × 8 image"


# ---------------------------------------------------------------------------------------------------------------
# The attacks: served behind the transform, nothing of the victim in the checkpoint


def test_an_attack_serves_the_victim_on_the_transformed_queries(victim: ImageClassifier, stats: dict) -> None:
    x = torch.randn(8, 1, 8, 8)
    attack = JpegAttack(victim, quality=20, **stats).eval()
    images = torch.rand(8, 1, 8, 8)
    assert torch.allclose(attack.to_pixels(attack.from_pixels(images)), images, atol=1e-5)
    expected = victim(attack.from_pixels(T.jpeg(attack.to_pixels(x), 20)))
    assert torch.allclose(attack(x), expected, atol=1e-5)
    flip = FlipAttack(victim).eval()
    assert torch.allclose(flip(x), victim(x.flip(-1)), atol=1e-5)
    assert flip.model is flip
    assert not flip.exposes_weights
    assert list(flip.state_dict()) == []
    assert list(flip.parameters()) == []
    assert (attack.epochs, attack.queries) == (0, 0)


def test_the_data_statistics_come_from_the_datamodule_when_not_given(
    victim: ImageClassifier, dm: DigitsDataModule, stats: dict
) -> None:
    attack = JpegAttack(victim, quality=50)
    with pytest.raises(RuntimeError, match="needs the data's normalisation: give mean= and std="):
        attack(torch.zeros(1, 1, 8, 8))
    given = _accuracy(JpegAttack(victim, quality=50, **stats), dm)
    assert _accuracy(attack, dm) == pytest.approx(given)
    assert attack.mean.flatten().tolist() == pytest.approx(stats["mean"])
    with pytest.raises(ValueError, match="give both mean and std"):
        JpegAttack(victim, mean=[0.3])


COSTS: dict[str, tuple[Callable, float, float]] = {
    # name: (attack given the victim and the data statistics, least and most accuracy points lost); measured on
    # the victim of 0.852 test accuracy: JPEG 90 0.847, JPEG 10 0.788, 4 bits 0.852, 1 bit 0.760, noise 0.1 0.844,
    # flip 0.262, mean 3 × 3 0.415, median 3 × 3 0.471, Gaussian σ 1 0.426, σ 0.5 0.791, squeezing (1 bit, 2 × 2)
    # 0.379, occlusion 1/4 0.805, a 10-epoch autoencoder 0.468
    "jpeg_90": (lambda v, s: JpegAttack(v, quality=90, **s), -1.0, 2.0),
    "jpeg_10": (lambda v, s: JpegAttack(v, quality=10, **s), 2.0, 12.0),
    "quantization_4": (lambda v, s: QuantizationAttack(v, bits=4, **s), -1.0, 2.0),
    "quantization_1": (lambda v, s: QuantizationAttack(v, bits=1, **s), 4.0, 20.0),
    "noise_0.1": (lambda v, s: InputNoiseAttack(v, sigma=0.1, **s), -1.0, 4.0),
    "flip": (lambda v, s: FlipAttack(v), 40.0, 80.0),
    "mean_3": (lambda v, s: SmoothingAttack(v, kind="mean", kernel_size=3), 25.0, 70.0),
    "median_3": (lambda v, s: SmoothingAttack(v, kind="median", kernel_size=3), 20.0, 60.0),
    "gaussian_1": (lambda v, s: SmoothingAttack(v, kind="gaussian", sigma=1.0), 25.0, 70.0),
    "gaussian_0.5": (lambda v, s: SmoothingAttack(v, kind="gaussian", sigma=0.5), 2.0, 12.0),
    "squeezing": (lambda v, s: FeatureSqueezingAttack(v, bits=1, kernel_size=2, **s), 30.0, 70.0),
    "occlusion": (lambda v, s: OcclusionAttack(v, size=0.25), 1.0, 10.0),
}


@pytest.mark.parametrize("name", list(COSTS))
def test_the_accuracy_cost_on_digits_is_the_measured_one(
    name: str, victim: ImageClassifier, dm: DigitsDataModule, stats: dict
) -> None:
    make, least, most = COSTS[name]
    drop = 100 * (_accuracy(victim, dm) - _accuracy(make(victim, stats), dm))
    assert least <= drop <= most, f"{name}: {drop:.1f} points"


def test_the_autoencoder_trains_on_the_attackers_data_and_leaves_the_victim(
    victim: ImageClassifier, dm: DigitsDataModule
) -> None:
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    L.seed_everything(0)
    attack = AutoencoderAttack(victim, optimizer=partial(torch.optim.Adam, lr=3e-3))
    x = dm.dataset("test").tensors[0][:256]
    untrained = torch.nn.functional.mse_loss(attack.autoencoder(x), x).item()
    fast_trainer(10, limit_val_batches=2).fit(attack, DigitsDataModule(batch_size=64, train_split="attacker"))
    assert torch.nn.functional.mse_loss(attack.autoencoder(x), x).item() < 0.6 * untrained
    assert attack.epochs == 10
    assert all(k.startswith("autoencoder.") for k in attack.state_dict())
    assert all(torch.equal(before[k], v) for k, v in victim.state_dict().items())
    assert 0.35 < _accuracy(attack, dm) < 0.8, "measured 0.468 after 10 epochs on 8 × 8 digits"


def test_a_pure_transform_fits_zero_epochs_without_an_optimizer(victim: ImageClassifier) -> None:
    attack = SmoothingAttack(victim, kind="median", kernel_size=3)
    assert attack.configure_optimizers() is None
    fast_trainer(0).fit(attack, DigitsDataModule(batch_size=64, train_split="attacker"))
    assert attack.epochs == 0


# ---------------------------------------------------------------------------------------------------------------
# Verdicts through the attacks


@pytest.mark.parametrize("scheme_name", ["noise", "usp", "csp"])
@pytest.mark.parametrize("attack_name", ["jpeg", "flip", "feature_squeezing", "chain"])
def test_a_black_box_key_gives_a_verdict_through_the_attack(
    scheme_name: str, attack_name: str, marked: Callable[[str], Marked]
) -> None:
    m = marked(scheme_name)
    L.seed_everything(0)
    verdict = m.key.verify(registry.attack(attack_name).example(m.model).eval(), alpha=0.01)
    assert isinstance(verdict, Verdict)
    assert verdict.queries > 0


@pytest.mark.parametrize("attack_name", ["jpeg", "smoothing", "autoencoder", "chain"])
def test_a_white_box_key_does_not_apply_to_a_served_model(attack_name: str, marked: Callable[[str], Marked]) -> None:
    m = marked("uchida")
    attack = registry.attack(attack_name).example(m.model)
    with pytest.raises(NotApplicable, match=f"the {type(attack).__name__} serves an API and exposes no weights"):
        m.key.verify(attack.eval(), alpha=0.01)


def test_the_new_attacks_are_registered_as_input_preprocessing() -> None:
    for name in NEW_ATTACKS:
        spec = registry.attack(name)
        assert spec.threat_model == "api-side"
        assert spec.category == ("combined" if name == "chain" else "input preprocessing")
        assert spec.example_epochs == (1 if name == "autoencoder" else 0)
    assert registry.attack_of(JpegAttack).name == "jpeg"


def test_benchmark_rows_carry_the_attack_category(tmp_path: Path, dm: DigitsDataModule) -> None:
    from lightning_wm.benchmark import Benchmark

    bench = Benchmark(
        ImageClassifier(SmallCNN(1, 10, 8), num_classes=10),
        dm,
        schemes={},
        attacks={"jpeg_50": partial(JpegAttack, quality=50), "prune": PruneAttack, "mine": lambda v: FlipAttack(v)},
        output_dir=tmp_path,
        progress=False,
    )
    row = {"acc": 0.8, "is_watermarked": False, "statistic_name": "matches", "statistic": 3.0, "p_value": 0.4}
    assert bench._verdict_row("jpeg_50", 0.82, row, [1.0, 2.0], True)["category"] == "input preprocessing"
    assert bench._verdict_row("prune", 0.82, row, [1.0, 2.0], True)["category"] == "model modification"
    assert bench._verdict_row("mine", 0.82, {"status": "n/a", "reason": "-"}, [1.0, 2.0], True)["category"] == ""
    assert bench._verdict_row("none", 0.82, {**row, "is_watermarked": True}, [1.0, 2.0], True)["category"] == ""


# ---------------------------------------------------------------------------------------------------------------
# ChainAttack


def test_a_chain_serves_the_last_part_on_the_previous_parts_model(victim: ImageClassifier) -> None:
    chain = ChainAttack(
        victim, [partial(PruneAttack, rate=0.5, scope="global"), partial(SmoothingAttack, kind="median")]
    ).eval()
    pruned = PruneAttack(victim, rate=0.5, scope="global").apply().model.eval()
    x = torch.randn(8, 1, 8, 8)
    assert torch.allclose(chain(x), pruned(T.median_blur(x, 3)), atol=1e-5)
    assert not chain.exposes_weights
    assert (chain.epochs, chain.queries) == (0, 0)
    assert chain.parts[0].sparsity == pytest.approx(0.5, abs=0.01)


def test_a_chain_trains_its_last_part_and_its_cost_is_the_sum_of_its_parts(
    victim: ImageClassifier, marked: Callable[[str], Marked]
) -> None:
    data = DigitsDataModule(batch_size=64, train_split="attacker")
    distill = partial(DistillationAttack, optimizer=partial(torch.optim.Adam, lr=2e-3))
    chain = ChainAttack(victim, [partial(PruneAttack, rate=0.3, scope="global"), distill])
    fast_trainer(2, limit_train_batches=3, limit_val_batches=1).fit(chain, data)
    assert chain.epochs == sum(p.epochs for p in chain.parts) == 2
    assert chain.queries == sum(p.queries for p in chain.parts) == chain.parts[-1].queries > 0
    assert chain.wall_time == pytest.approx(sum(p.wall_time for p in chain.parts))

    m = marked("uchida")
    fine_pruning = ChainAttack(
        m.model, [partial(PruneAttack, rate=0.5, scope="global"), partial(FineTuneAttack, mode="FTAL")]
    )
    fast_trainer(1, limit_train_batches=3, limit_val_batches=1).fit(fine_pruning, data)
    assert fine_pruning.exposes_weights
    assert fine_pruning.epochs == 1
    assert isinstance(m.key.verify(fine_pruning.eval(), alpha=0.01), Verdict), "a white-box key reads the weights"


def test_a_chain_refuses_a_weight_modification_behind_an_api(victim: ImageClassifier, stats: dict) -> None:
    with pytest.raises(ValueError, match="modifies weights after JpegAttack.*put the model modifications first"):
        ChainAttack(victim, [partial(JpegAttack, **stats), partial(PruneAttack, rate=0.3)])
    with pytest.raises(ValueError, match="at least one part"):
        ChainAttack(victim, [])
    both = ChainAttack(victim, [partial(JpegAttack, quality=30, **stats), FlipAttack]).eval()
    x = torch.randn(4, 1, 8, 8)
    jpeg = JpegAttack(victim, quality=30, **stats).eval()
    assert torch.allclose(both(x), jpeg(x.flip(-1)), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The configs, through the CLI


def test_the_configs_run_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from lightning_wm.cli import main

    configs = Path(__file__).resolve().parents[1] / "configs"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-wm"])
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]
    main(["fit", "--config", str(configs / "digits" / "baseline.yaml"), "--trainer.max_epochs=1", *quiet])
    victim = "--model.init_args.victim=outputs/digits/baseline/last.ckpt"
    for name in ("chain_prune_smooth", "jpeg", "feature_squeezing"):
        capsys.readouterr()
        main(["test", "--config", str(configs / "attacks" / f"{name}.yaml"), victim, *quiet])
        assert "test/acc" in capsys.readouterr().out, name
    main(["fit", "--config", str(configs / "attacks" / "autoencoder.yaml"), victim, "--trainer.max_epochs=1", *quiet])
    assert Path("outputs/digits/attacks/autoencoder/last.ckpt").is_file()


@pytest.mark.parametrize("name", NEW_ATTACKS)
def test_every_new_attack_has_a_config(name: str) -> None:
    configs = Path(__file__).resolve().parents[1] / "configs" / "attacks"
    assert (configs / ("chain_prune_smooth.yaml" if name == "chain" else f"{name}.yaml")).is_file()
