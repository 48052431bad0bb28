"""BlackMarks (Chen et al. 2019) and EWE (Jia et al. 2021) beyond the conformance suite: what their nulls protect
against. A suspect on which BlackMarks' targeted key images transfer (bit error rate 0 on every key image, owner's
or not) is not declared, though the paper's binomial at 1/2 would declare it; a suspect that sends any stamped
source image to the target class is not declared by EWE, though its trigger accuracy is 100%; SNNL is high for
entangled features and low for separated ones, and EWE entangles the layers it names."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import Marked, example_model

from lightning_wm.verify.stats import binomial_log10_p_value
from lightning_wm.watermarks.ewe import EWEWatermark
from lightning_wm.watermarks.functional import soft_nearest_neighbor_loss

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA = 0.01


class _LookUp:
    """A black-box suspect answering each query from a table of (input, label) rows; ``default`` elsewhere."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, default: int | None = None) -> None:
        self.inputs = inputs.flatten(1).float()
        self.labels = labels.long()
        self.default = default

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        distance, row = torch.cdist(x.flatten(1).float(), self.inputs).min(dim=1)
        answers = self.labels[row]
        if self.default is not None:
            answers = torch.where(distance < 1e-4, answers, torch.full_like(answers, self.default))
        return answers


def test_blackmarks_classes_split_in_two_and_the_signature_is_half_of_each_bit_value(
    marked: Callable[[str], Marked],
) -> None:
    t = marked("blackmarks").key.tensors
    assert set(t["class_bits"].tolist()) == {0, 1}, "the encoding scheme uses both bits"
    for bit in (0, 1):
        owner, null = int((t["embed_bits"] == bit).sum()), int((t["null_bits"] == bit).sum())
        assert abs(owner - null) <= 1, "a random half of each bit value is the owner's"
    assert torch.equal(t["class_bits"][t["embed_labels"]], t["embed_bits"]), "each key's label decodes to its bit"


def test_blackmarks_does_not_declare_a_suspect_on_which_every_key_image_transfers(
    marked: Callable[[str], Marked],
) -> None:
    m = marked("blackmarks")
    t = m.key.tensors
    transfer = _LookUp(
        torch.cat([t["verify_inputs"], t["null_inputs"], t["probe_inputs"]]),
        torch.cat([t["verify_labels"], t["null_labels"], t["probe_labels"]]),
    )
    verdict = m.key.verify(transfer, alpha=ALPHA)
    assert verdict.statistic == 0.0, "every bit decodes right"
    bits = len(t["embed_bits"])
    assert binomial_log10_p_value(bits, bits, 0.5) < -10, "the paper's binomial at 1/2 would declare it"
    assert not verdict.is_watermarked, verdict
    assert verdict.p_value == pytest.approx(1.0)
    assert m.key.verify(m.model, alpha=ALPHA).is_watermarked


@pytest.mark.parametrize("target_drawn", [True, False], ids=["secret-target", "fixed-target"])
def test_ewe_does_not_declare_a_suspect_that_sends_any_stamped_source_image_to_the_target(
    target_drawn: bool, marked: Callable[[str], Marked]
) -> None:
    key = marked("ewe").key
    if not target_drawn:
        key = type(key)({**key.config, "target_drawn": False}, key.tensors)
    t = key.tensors
    sources = t["verify_sources"]
    clean = torch.full((len(sources),), int(key.config["source_class"]))
    stamp_happy = _LookUp(
        torch.cat([sources, t["probe_inputs"]]),
        torch.cat([clean, t["probe_labels"]]),
        default=int(key.config["target_class"]),
    )
    verdict = key.verify(stamp_happy, alpha=ALPHA)
    assert verdict.statistic == 1.0, "its trigger accuracy is perfect"
    assert not verdict.is_watermarked, verdict
    if not target_drawn:
        assert verdict.p_value > 0.5, "(nearly) every null trigger toward the same class matches it"


def test_snnl_is_high_for_entangled_features_and_low_for_separated_ones() -> None:
    torch.manual_seed(0)
    labels = torch.arange(64) % 2
    mixed = torch.randn(64, 16)
    apart = torch.where(labels[:, None].bool(), mixed + 6.0, mixed - 6.0)
    assert soft_nearest_neighbor_loss(mixed, labels) > 0.6
    assert soft_nearest_neighbor_loss(apart, labels, temperature=0.1) < 0.01
    assert soft_nearest_neighbor_loss(apart, labels) < soft_nearest_neighbor_loss(mixed, labels) / 4
    assert soft_nearest_neighbor_loss(mixed * 100, labels) == pytest.approx(
        float(soft_nearest_neighbor_loss(mixed, labels)), rel=1e-4
    ), "scale-free: the features are L2-normalised"


def test_ewe_entangles_the_last_three_hidden_layers_by_default_and_names_a_missing_one() -> None:
    model = example_model("ewe")
    assert list(EWEWatermark().entangled_modules(model)) == ["backbone.conv2", "backbone.conv3", "backbone.fc"]
    with pytest.raises(ValueError, match="no module named"):
        EWEWatermark(layers=["backbone.conv9"]).entangled_modules(model)


def test_ewe_keys_shrink_to_the_source_images_an_attackers_split_has() -> None:
    from lightning_wm.watermarks.ewe import MIN_VERIFY, shares_of_source_images

    assert shares_of_source_images(100, 40, 30, source=1) == (40, 30)
    with pytest.warns(UserWarning, match="fewer than num_keys"):
        keys, verify = shares_of_source_images(45, 40, 30, source=1)
    assert keys + verify == 45
    assert verify >= MIN_VERIFY
    with pytest.raises(ValueError, match="lower num_keys or num_verify"):
        shares_of_source_images(MIN_VERIFY, 40, 30, source=1)


def test_ewe_learns_a_temperature_per_layer_down_its_snnl_and_still_declares_its_model(dm) -> None:
    """temperature_lr > 0 (the paper's learned temperatures): every entangled layer's temperature moves from its
    start, stays in bounds, goes into the callback's checkpoint state, and the marked model is still declared."""
    import lightning as L
    from conftest import fast_trainer

    from lightning_wm.watermarks.ewe import TEMPERATURE_RANGE

    scheme = EWEWatermark(num_keys=30, num_verify=40, key_ratio=0.25, seed=3, temperature_lr=0.1)
    L.seed_everything(3)
    model = example_model("ewe")
    fast_trainer(5, [scheme]).fit(model, dm)
    assert sorted(scheme.temperatures) == ["backbone.conv2", "backbone.conv3", "backbone.fc"]
    assert all(TEMPERATURE_RANGE[0] <= t <= TEMPERATURE_RANGE[1] for t in scheme.temperatures.values())
    assert all(abs(t - 1.0) > 1e-3 for t in scheme.temperatures.values()), scheme.temperatures
    assert scheme.state_dict()["temperatures"] == scheme.temperatures
    verdict = scheme.verify(model.eval())
    assert verdict.is_watermarked, verdict
    fixed = EWEWatermark(num_keys=30, num_verify=40, key_ratio=0.25, seed=3)
    fast_trainer(1, [fixed]).fit(example_model("ewe"), dm)
    assert fixed.temperatures == {}
    with pytest.raises(ValueError, match="temperature_lr"):
        EWEWatermark(temperature_lr=-1.0)
