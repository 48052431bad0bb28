"""Adi et al.'s abstract trigger set (``adi``) and Le Merrer et al.'s frontier stitching (``frontier_stitching``)
on digits, with their registry examples: the marked model is declared, an unmarked and an untrained one are not;
Adi's images are the expansion of the key's secret (a user folder's are not); frontier stitching's null keys are
never trained on, and a clean model agrees with owner and null keys alike."""

from __future__ import annotations

import types
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import embed_example, example_model, fast_trainer
from lightning.pytorch.callbacks import Callback

from lightning_wm import ImageClassifier
from lightning_wm.data import DigitsDataModule
from lightning_wm.models import SmallCNN
from lightning_wm.verify import load_key
from lightning_wm.verify.derive import derived_rng
from lightning_wm.watermarks import AbstractTrigger, FrontierStitchingWatermark, TriggerSetWatermark
from lightning_wm.watermarks.abstract import abstract_images

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA = 0.01
SCHEMES = ("adi", "frontier_stitching")


def _unmarked(seed: int, epochs: int, dm: DigitsDataModule) -> ImageClassifier:
    L.seed_everything(seed)
    model = example_model("adi")
    fast_trainer(epochs, limit_val_batches=0).fit(model, dm)
    return model.eval()


@pytest.fixture(scope="module")
def marked(dm: DigitsDataModule, tmp_path_factory) -> dict[str, tuple]:
    root = tmp_path_factory.mktemp("blackbox")
    return {name: embed_example(name, 1, dm, key_path=root / f"{name}.key", limit_val_batches=0) for name in SCHEMES}


@pytest.mark.parametrize("name", SCHEMES)
def test_the_marked_model_is_declared_and_an_unmarked_or_untrained_one_is_not(
    name: str, marked: dict[str, tuple], dm: DigitsDataModule
) -> None:
    scheme, model, _ = marked[name]
    key = load_key(scheme.key_path)
    verdict = key.verify(model, alpha=ALPHA)
    assert verdict.is_watermarked, verdict
    assert verdict.log10_p < -4, verdict
    unmarked = _unmarked(1, 8, dm)  # the marked model's seed and as many epochs (warm-up included)
    torch.manual_seed(0)
    untrained = ImageClassifier(SmallCNN(1, 10, 8), num_classes=10).eval()
    for innocent in (unmarked, untrained):
        assert not key.verify(innocent, alpha=ALPHA).is_watermarked
    assert key.verify(untrained, alpha=ALPHA).is_undecidable


def test_adi_images_are_the_expansion_of_the_secret_and_differ_between_keys(
    marked: dict[str, tuple], dm: DigitsDataModule
) -> None:
    scheme, _, _ = marked["adi"]
    key = scheme.key
    assert key.config["generator"] == "AbstractTrigger"
    assert key.check_derivation(dm), "an abstract key is re-derived from its secret and the owner's data"
    rng = derived_rng(key.secret, "trigger_set/key")
    images = abstract_images(len(key.tensors["embed_labels"]), (1, 8, 8), rng)
    assert torch.allclose(dm.normalize(images), key.tensors["embed_inputs"])
    assert images.std(dim=(1, 2, 3)).min() > 0.05, "every image has structure"
    other = TriggerSetWatermark(AbstractTrigger(), num_keys=20, seed=2)
    other_key = other._new_key(types.SimpleNamespace(datamodule=dm), example_model("adi"))
    assert not torch.allclose(other_key.tensors["embed_inputs"], key.tensors["embed_inputs"])
    tampered = type(key)(key.config, {**key.tensors, "embed_inputs": key.tensors["embed_inputs"].flip(0)})
    with pytest.raises(Exception, match="was not generated from its seed"):
        tampered.check_derivation(dm)


def test_a_key_of_the_users_own_images_is_reported_not_derived(tmp_path: Path, dm: DigitsDataModule) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(6):
        pixels = (torch.rand(16, 12, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    scheme = TriggerSetWatermark(AbstractTrigger(folder=str(folder)), num_keys=5, seed=3)
    key = scheme._new_key(types.SimpleNamespace(datamodule=dm), example_model("adi"))
    assert key.tensors["embed_inputs"].shape == (5, 1, 8, 8)
    assert key.config["generator_init"] is None
    assert key.check_derivation(dm) is False
    with pytest.raises(ValueError, match="needs 10 images"):
        TriggerSetWatermark(AbstractTrigger(folder=str(folder)), num_keys=10, seed=3)._new_key(
            types.SimpleNamespace(datamodule=dm), example_model("adi")
        )


class _Batches(Callback):
    """Records the training batches as the model sees them (after the scheme added its keys)."""

    def __init__(self) -> None:
        self.extra: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.extra.append(batch[0][64:].detach().clone())


def _rows_in(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return (rows.flatten(1)[:, None] == table.flatten(1)[None]).all(-1).any(-1)


def test_frontier_null_keys_are_never_embedded(dm: DigitsDataModule) -> None:
    spy = _Batches()
    scheme = FrontierStitchingWatermark(num_keys=20, warmup_epochs=1, keys_per_batch=8, seed=4)
    L.seed_everything(4)
    fast_trainer(1, [scheme, spy], limit_val_batches=0, limit_train_batches=6).fit(example_model("adi"), dm)
    key = scheme.key
    owner, null = key.tensors["embed_inputs"], key.tensors["null_inputs"]
    assert len(owner) == len(null) == 20
    assert not _rows_in(null, owner).any(), "owner and null frontier samples come from distinct source images"
    injected = torch.cat(spy.extra)
    assert len(injected) == 6 * 8
    assert _rows_in(injected, owner).all()
    assert not _rows_in(injected, null).any()
    assert torch.equal(key.tensors["verify_inputs"], owner)
    assert key.scheme == "frontier_stitching"
    assert key.config["null_test"] == "fisher stratified by kind"
    for kind in (True, False):  # a random half of each kind of frontier sample is the owner's
        owner_kind = int((key.tensors["embed_true_adversary"] == kind).sum())
        null_kind = int((key.tensors["null_true_adversary"] == kind).sum())
        assert abs(owner_kind - null_kind) <= 1, (kind, owner_kind, null_kind)
    assert key.check_derivation(dm) is False, "frontier samples depend on the model's gradients: not checkable"
    true = key.config["true_adversaries"]
    assert 0 < true["embed"] + true["null"] < 40, "both true and false adversaries"


def test_a_clean_model_agrees_with_owner_and_null_frontier_keys_alike(
    marked: dict[str, tuple], dm: DigitsDataModule
) -> None:
    key = marked["frontier_stitching"][0].key
    gaps, p_values = [], []
    for seed in (100, 101, 102, 103):
        verdict = key.verify(_unmarked(seed, 8, dm), alpha=ALPHA)
        gaps.append(verdict.statistic - verdict.details["null_rate"])
        p_values.append(verdict.p_value)
    assert abs(sum(gaps) / len(gaps)) < 0.1, gaps
    assert min(p_values) > ALPHA, p_values
    marked_verdict = key.verify(marked["frontier_stitching"][1], alpha=ALPHA)
    assert marked_verdict.statistic - marked_verdict.details["null_rate"] > 0.2, marked_verdict
