"""DeepSigns (activations, white-box), DAWN (the serving API) and DeepMarks (fingerprints, white-box) on digits.

DeepSigns and DeepMarks are also held to ``tests/test_conformance.py`` through the registry; DAWN is not registered
(its watermark lives in the served API, not in the trained model: see :mod:`lightning_wm.watermarks.dawn`), so its
extraction test, its null and its forgery check are here.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import fast_trainer

from lightning_wm import ImageClassifier
from lightning_wm.attacks import CollusionAttack, DistillationAttack
from lightning_wm.data import DigitsDataModule
from lightning_wm.models import SmallCNN
from lightning_wm.verify import NotApplicable
from lightning_wm.verify.blackbox import BlackBoxModel, white_box_module
from lightning_wm.verify.keys import ForgedKeyError
from lightning_wm.verify.stats import queries_to_significance
from lightning_wm.watermarks.dawn import DAWNKey, DAWNWatermark
from lightning_wm.watermarks.deepmarks import DeepMarksWatermark, and_acc_codes, name_colluders
from lightning_wm.watermarks.deepsigns import DeepSignsWatermark

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 8


def _model(seed: int) -> ImageClassifier:
    L.seed_everything(seed)
    return ImageClassifier(SmallCNN(1, 10, WIDTH), num_classes=10)


def _accuracy(model: torch.nn.Module, dm: DigitsDataModule) -> float:
    x, y = dm.dataset("test").tensors[:2]
    with torch.no_grad():
        return float((model.eval()(x).argmax(-1) == y).float().mean())


@pytest.fixture(scope="module")
def clean(dm: DigitsDataModule) -> ImageClassifier:
    model = _model(100)
    fast_trainer(6, limit_val_batches=0).fit(model, dm)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# DeepSigns


def test_deepsigns_embeds_in_the_activations_and_reads_them_white_box(
    dm: DigitsDataModule, clean: ImageClassifier
) -> None:
    scheme = DeepSignsWatermark(layer="fc", bits=32, triggers=16, classes=(3, 7), seed=1)
    model = _model(1)
    fast_trainer(6, [scheme], limit_val_batches=0).fit(model, dm)
    verdict = scheme.verify(model.eval())
    assert verdict.is_watermarked, verdict
    assert verdict.statistic == 0.0
    assert verdict.log10_p < -9
    assert _accuracy(model, dm) > _accuracy(clean, dm) - 0.05
    assert not scheme.verify(clean).is_watermarked
    assert scheme.key.check_derivation(dm)
    with pytest.raises(NotApplicable, match="exposes no weights"):
        scheme.key.verify(BlackBoxModel(model, output="labels"))
    forged = type(scheme.key)(scheme.key.config, {**scheme.key.tensors, "message": scheme.key.extract(clean)})
    with pytest.raises(ForgedKeyError, match="message"):
        forged.check_derivation(dm)


# ---------------------------------------------------------------------------------------------------------------
# DAWN


@pytest.fixture(scope="module")
def dawn(dm: DigitsDataModule) -> tuple[DAWNWatermark, ImageClassifier]:
    scheme = DAWNWatermark(share=0.05, seed=1)
    model = _model(1)
    fast_trainer(6, [scheme], limit_val_batches=0).fit(model, dm)
    return scheme, model.eval()


def _fresh_key(scheme: DAWNWatermark) -> DAWNKey:
    key = scheme.key
    return DAWNKey(key.config, {**key.tensors, **{n: key.tensors[n][:0] for n in ("inputs", "answers", "labels")}})


def test_dawn_changes_a_keyed_share_of_answers_to_keyed_wrong_labels(dawn, dm: DigitsDataModule) -> None:
    scheme, model = dawn
    key = _fresh_key(scheme)
    head = key.serve(model)
    x = dm.dataset("test").tensors[0]
    with torch.no_grad():
        served, own = head(x).argmax(-1), model(x).argmax(-1)
    chosen = key.selected(x)
    assert 0.02 < float(chosen.float().mean()) < 0.09
    assert torch.equal(served != own, chosen)
    assert head.queries == len(x)
    assert head.watermark_queries == int(chosen.sum())
    assert len(key.tensors["inputs"]) == int(chosen.sum())
    with torch.no_grad():
        assert torch.equal(head(x).argmax(-1), served), "the answers are a pure function of the input and the key"
    assert len(key.tensors["inputs"]) == int(chosen.sum()), "a repeated query is logged once"
    assert not key.verify(model).is_watermarked, "the owner's unserved model gives its own answers, never the changed"
    with pytest.raises(NotApplicable, match="serves an API"):
        white_box_module(head, "dawn")


def test_a_student_distilled_from_the_dawn_api_is_declared(dawn, dm: DigitsDataModule, clean: ImageClassifier) -> None:
    scheme, model = dawn
    key = _fresh_key(scheme)
    L.seed_everything(0)
    attack = DistillationAttack(key.serve(model), student=SmallCNN(1, 10, WIDTH), output="labels")
    fast_trainer(20, limit_val_batches=0).fit(attack, DigitsDataModule(batch_size=64, train_split="attacker"))
    distinct = len(DigitsDataModule(batch_size=64).dataset("attacker"))
    logged = len(key.tensors["inputs"])
    assert attack._api.queries == 20 * distinct
    assert 0 < logged < 0.1 * distinct
    verdict = key.verify(attack.eval())
    needed = queries_to_significance(verdict.statistic, 1 / 9, alpha=1e-6)
    print(
        f"DAWN share 5%: {attack._api.queries} queries ({distinct} distinct), {logged} watermark queries logged; "
        f"student accuracy {_accuracy(attack.model, dm):.3f}, {verdict}; {needed} watermark queries "
        f"(~{needed / 0.05:.0f} distinct queries at 5%, ~{needed / 0.005:.0f} at the paper's 0.5%) reach p < 1e-6"
    )
    assert verdict.is_watermarked, verdict
    assert verdict.queries > 0
    assert not key.verify(clean).is_watermarked


def test_dawn_refuses_an_edited_log_and_a_degenerate_suspect(dawn, dm: DigitsDataModule) -> None:
    scheme, model = dawn
    key = _fresh_key(scheme)
    key.record_reference(model, dm.dataset("test").tensors[0])
    assert key.check_derivation(dm)
    assert key.answers_match(model)
    labels = key.tensors["labels"].clone()
    labels[0] = (labels[0] + 1) % 10
    with pytest.raises(ForgedKeyError, match="labels"):
        DAWNKey(key.config, {**key.tensors, "labels": labels}).check_derivation(dm)
    inputs = dm.dataset("val").tensors[0][: len(labels)]
    with pytest.raises(ForgedKeyError, match="inputs"):
        DAWNKey(key.config, {**key.tensors, "inputs": inputs}).check_derivation(dm)

    def constant(x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x),), int(key.tensors["labels"][0]))

    assert key.verify(constant).is_undecidable


def test_a_dawn_key_file_keeps_the_log_and_a_rerun_reads_it(dawn, dm: DigitsDataModule, tmp_path) -> None:
    scheme, model = dawn
    key = _fresh_key(scheme)
    key.record_reference(model, dm.dataset("test").tensors[0])
    path = key.save_key(tmp_path / "dawn.key")
    again = DAWNKey.load(path)
    assert again.fingerprint() == key.fingerprint()
    assert torch.equal(again.tensors["labels"], key.tensors["labels"])
    rerun = DAWNWatermark(share=0.05, key_path=str(path))
    fast_trainer(1, [rerun], limit_train_batches=2, limit_val_batches=0).fit(_model(3), dm)
    assert rerun.key.fingerprint() == key.fingerprint()


# ---------------------------------------------------------------------------------------------------------------
# DeepMarks


def test_the_fano_and_acc_code_names_any_two_colluders() -> None:
    codes = and_acc_codes("fano").bool()
    assert codes.sum(1).tolist() == [4] * 7
    for j in range(7):
        assert name_colluders(codes[j], "fano") == [j]
        for k in range(j + 1, 7):
            assert name_colluders(codes[j] & codes[k], "fano") == [j, k]


@pytest.fixture(scope="module")
def copies(dm: DigitsDataModule) -> dict[int, ImageClassifier]:
    """Users 0..3's copies, each fine-tuned with its code from one base model the owner trained (as in the paper:
    copies of one model, so that averaging them keeps a working model)."""
    base = _model(0)
    fast_trainer(5, limit_val_batches=0).fit(base, dm)
    result = {}
    for user in range(4):
        L.seed_everything(user)
        model = copy.deepcopy(base)
        scheme = DeepMarksWatermark(user=user, repeat=12, layer="conv3", strength=1.0, seed=7)
        fast_trainer(6, [scheme], limit_val_batches=0).fit(model, dm)
        result[user] = model.eval()
    result[-1] = base.eval()
    return result


def _deepmarks_key(dm: DigitsDataModule):
    import types

    scheme = DeepMarksWatermark(repeat=12, layer="conv3", seed=7)
    return scheme._new_key(types.SimpleNamespace(datamodule=dm), _model(0))


def test_each_users_copy_names_that_user(copies, dm: DigitsDataModule) -> None:
    key = _deepmarks_key(dm)
    assert key.check_derivation(dm)
    for user in range(4):
        verdict = key.verify(copies[user])
        print(
            f"DeepMarks user {user}: {verdict}, named {verdict.details['users']}, "
            f"accuracy {_accuracy(copies[user], dm):.3f} (base {_accuracy(copies[-1], dm):.3f})"
        )
        assert verdict.is_watermarked, verdict
        assert verdict.details["user"] == user
        assert verdict.details["users"] == [user]
        assert _accuracy(copies[user], dm) > _accuracy(copies[-1], dm) - 0.05
    assert not key.verify(copies[-1]).is_watermarked, "the base model carries no code"


@pytest.mark.parametrize("group", [(0, 1), (1, 3), (0, 2)])
def test_averaging_two_copies_names_both_colluders(group, copies, dm: DigitsDataModule) -> None:
    key = _deepmarks_key(dm)
    attack = CollusionAttack([copies[u] for u in group])
    verdict = key.verify(attack.eval())
    print(
        f"DeepMarks collusion {group}: {verdict}, named {verdict.details['users']}, "
        f"accuracy {_accuracy(attack, dm):.3f}"
    )
    assert verdict.is_watermarked, verdict
    assert verdict.details["users"] == list(group)
    assert _accuracy(attack, dm) > 0.85


def test_a_collusion_needs_copies_of_one_architecture(copies) -> None:
    with pytest.raises(ValueError, match="at least two"):
        CollusionAttack([copies[0]])
    with pytest.raises(ValueError, match="architecture"):
        CollusionAttack([copies[0], ImageClassifier(SmallCNN(1, 10, 16), num_classes=10)])
