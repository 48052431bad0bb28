"""Reliability of every registered scheme beyond the conformance suite (tests/test_conformance.py), on digits
with tiny models (SmallCNN, width 8): key files are checked, bad input is a one-line error, seeds make keys and
verdicts reproducible, bf16-mixed embeds at a larger width (slow), and 2-process CPU DDP gives the single-process
verdict (slow, ``-m ddp``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import (
    WIDTH,
    ExitingDDPSpawn,
    Marked,
    assert_innocent,
    example_model,
    example_scheme,
    fast_trainer,
    slow_if_from_gradients,
)

from lightning_wm import ImageClassifier, registry
from lightning_wm.attacks import DistillationAttack, EvasionAttack, FineTuneAttack, OverwriteAttack, PruneAttack
from lightning_wm.data import (
    CIFAR10DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
)
from lightning_wm.models import MLP, SmallCNN
from lightning_wm.verify import KEY_FORMAT_VERSION, KeyFileError, Verdict, load_key
from lightning_wm.watermarks import (
    ContentTrigger,
    CSPWatermark,
    NewLabelTrigger,
    NoiseTrigger,
    TriggerSetWatermark,
    UchidaWatermark,
    WatermarkScheme,
)

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS = 3
# USP and baked CSP are embedded as their configs do, to convergence (at 3 epochs baked CSP's z is near 0 on these
# width-8 models); USP's keys' nulls come from held-out clean references (test_usp_keys_do_not_declare_unmarked_models
# checks a 3-epoch key too).
SCHEME_EPOCHS = {"usp": 12, "csp": 12}
ALPHA = 0.01
FAST_NULL_SEEDS = range(100, 103)
SLOW_NULL_SEEDS = range(100, 110)


def _fashion_dir() -> str | None:
    """Where UnrelatedTrigger finds Fashion-MNIST (its unrelated images for a digits model), or None."""
    if any(Path(d).is_dir() for d in FashionMNISTDataModule.offline_dirs):
        return str(Path(os.environ.get("TMPDIR", "/tmp")) / "lightning_wm_fashion")
    return None


FASHION_DIR = _fashion_dir()


SCHEMES = sorted(registry.schemes())
PARAMS = SCHEMES
_scheme = example_scheme


def _model(name: str = "uchida", width: int = WIDTH) -> ImageClassifier:
    return example_model(name, width)


@pytest.fixture(scope="module")
def clean_models(dm: DigitsDataModule) -> dict[int, ImageClassifier]:
    """Unmarked models trained like the marked ones (same architecture, epochs and data), other seeds."""
    models = {}
    for seed in range(100, 103):
        L.seed_everything(seed)
        models[seed] = ImageClassifier(SmallCNN(1, 10, WIDTH), num_classes=10)
        fast_trainer(EPOCHS, limit_val_batches=0).fit(models[seed], dm)
    return {seed: model.eval() for seed, model in models.items()}


def _one_line(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


@pytest.mark.parametrize("name", PARAMS)
def test_edited_truncated_foreign_and_future_key_files_are_refused(
    name: str, marked: Callable[[str], Marked], tmp_path: Path
) -> None:
    raw = marked(name).key_path.read_bytes()
    header, _, payload = raw.partition(b"\n")
    variants = {
        "edited": raw[: len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0x01]) + raw[len(raw) // 2 + 1 :],
        "truncated": raw[: len(raw) - 100],
        "future": header.replace(b" %d " % KEY_FORMAT_VERSION, b" %d " % (KEY_FORMAT_VERSION + 1)) + b"\n" + payload,
    }
    garbage = b"\x80\x02not a torch payload"
    variants["rehashed"] = b"lightning-wm-key 1 " + hashlib.sha256(garbage).hexdigest().encode() + b"\n" + garbage
    buffer = io.BytesIO()
    torch.save({"something": torch.zeros(2)}, buffer)
    variants["not_a_key"] = b"lightning-wm-key 1 " + hashlib.sha256(buffer.getvalue()).hexdigest().encode()
    variants["not_a_key"] += b"\n" + buffer.getvalue()
    expected = {
        "edited": "is corrupt: its SHA-256 does not match",
        "truncated": "is corrupt: its SHA-256 does not match",
        "future": f"key format version {KEY_FORMAT_VERSION + 1}, newer than this lightning-wm reads",
        "rehashed": "is corrupt: its payload does not load",
        "not_a_key": "is corrupt: its payload lacks",
    }
    for variant, content in variants.items():
        path = tmp_path / f"{variant}.key"
        path.write_bytes(content)
        with pytest.raises(KeyFileError) as err:
            load_key(path)
        message = _one_line(err.value)
        assert str(path) in message
        assert expected[variant] in message, message
    scheme = marked(name).key.scheme
    other = "uchida" if scheme != "uchida" else "csp"
    with pytest.raises(KeyFileError, match=f"holds a key of scheme '{scheme}', expected '{other}'") as err:
        load_key(marked(name).key_path, scheme=other)
    _one_line(err.value)
    with pytest.raises(KeyFileError, match=f"needs a '{other}' key|holds a key of scheme") as err:
        _scheme({"uchida": "uchida", "csp": "csp"}[other], seed=0, key_path=marked(name).key_path).setup(
            fast_trainer(1), _model(), "fit"
        )


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each a clear one-line error


def test_a_layer_that_does_not_exist(dm: DigitsDataModule, marked: Callable[[str], Marked]) -> None:
    with pytest.raises(ValueError, match="no layer named 'conv9'; valid names: .*conv2") as err:
        fast_trainer(1, [UchidaWatermark(layer="conv9", seed=0)], limit_train_batches=1).fit(_model(), dm)
    _one_line(err.value)
    key = marked("uchida").key
    with pytest.raises(ValueError, match="no layer named 'conv9'") as err:
        key.verify(marked("uchida").model, layer="conv9")
    _one_line(err.value)
    with pytest.raises(ValueError, match="weight shape .* name the matching layer") as err:
        key.verify(_model(width=16))
    _one_line(err.value)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (torch.ones(3, 3, 3), "patch has 3 channels, the images have 1"),
        (torch.ones(1, 9, 9), "does not fit 8×8 images"),
        (torch.ones(1, 1, 2, 2), r"patch must be \(C, h, w\) or \(h, w\)"),
        (torch.full((1, 2, 2), 2.0), r"pixels must be in \[0, 1\]"),
        ("file", r"patch must be \(C, h, w\)"),
    ],
)
def test_a_trigger_image_of_the_wrong_shape(patch, message: str, dm: DigitsDataModule, tmp_path: Path) -> None:
    if isinstance(patch, str):
        patch = str(tmp_path / "logo.pt")
        torch.save(torch.ones(2, 1, 2, 2), patch)
    scheme = TriggerSetWatermark(ContentTrigger(patch=patch), num_keys=8, num_verify=8, seed=0)
    with pytest.raises(ValueError, match=message) as err:
        fast_trainer(1, [scheme], limit_train_batches=1).fit(_model(), dm)
    _one_line(err.value)


@pytest.mark.parametrize(
    ("generator", "outputs", "classes", "message"),
    [
        (lambda: NewLabelTrigger(alpha_fraction=0.05), 11, 11, r"K\+1 = 12 outputs.*num_classes to 12"),
        (lambda: NewLabelTrigger(alpha_fraction=0.05), 10, 10, r"K\+1 = 11 outputs.*num_classes to 11"),
        (lambda: ContentTrigger(target_class=10), 10, 10, "target_class 10 is not one of the 10 classes"),
        (lambda: NoiseTrigger(target_class=0), 11, 10, "keys are for a model with 10 outputs"),
    ],
    ids=["new-label-K-set-to-K+1", "new-label-K-outputs", "target-out-of-range", "extra-output"],
)
def test_num_classes_that_do_not_fit_the_scheme(generator, outputs, classes, message, dm: DigitsDataModule) -> None:
    scheme = TriggerSetWatermark(generator(), num_keys=8, num_verify=8, seed=0)
    model = ImageClassifier(SmallCNN(1, outputs, WIDTH), num_classes=classes)
    with pytest.raises(ValueError, match=message) as err:
        fast_trainer(1, [scheme], limit_train_batches=1).fit(model, dm)
    _one_line(err.value)


@pytest.mark.parametrize("name", ["usp", "csp"])
@pytest.mark.parametrize("outputs", [5, 11])
def test_a_suspect_with_another_number_of_outputs(name: str, outputs: int, marked: Callable[[str], Marked]) -> None:
    key = marked(name).key
    suspect = ImageClassifier(SmallCNN(1, outputs, WIDTH)).eval()
    with pytest.raises(ValueError, match=f"returns {outputs} outputs per query, the .* key is for models with 10"):
        key.verify(suspect)
    with pytest.raises(ValueError, match=f"returns {outputs} outputs per query") as err:
        key.verify(lambda x: torch.softmax(suspect(x), -1))
    _one_line(err.value)


def _write_idx(path: Path, array: torch.Tensor) -> None:
    dims = array.shape
    magic = 0x0800 | len(dims)
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in dims)
    path.write_bytes(header + array.to(torch.uint8).numpy().tobytes())


def test_an_empty_or_corrupt_dataset_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    errors = []
    empty = tmp_path / "empty"
    empty.mkdir()
    for module in (
        MNISTDataModule(data_dir=str(empty), download=False),
        CIFAR10DataModule(data_dir=str(empty), download=False),
    ):
        with pytest.raises(DatasetNotFoundError, match="not found") as err:
            module.setup()
        errors.append(err.value)
    (empty / "cifar-10-batches-py").mkdir()
    with pytest.raises(DatasetNotFoundError, match="not found") as err:
        CIFAR10DataModule(data_dir=str(empty), download=False).setup()
    errors.append(err.value)

    cifar = tmp_path / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    (cifar / "data_batch_1").write_bytes(b"\x80\x04 this is not a pickle")
    (cifar / "test_batch").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="data_batch_1 is corrupt") as err:
        CIFAR10DataModule(data_dir=str(tmp_path / "cifar"), download=False).setup()
    errors.append(err.value)

    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte", torch.zeros(4, 28, 28))
    _write_idx(raw / "train-labels-idx1-ubyte", torch.zeros(4))
    _write_idx(raw / "t10k-images-idx3-ubyte", torch.zeros(2, 28, 28))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09\x01")
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte is corrupt") as err:
        MNISTDataModule(data_dir=str(tmp_path / "mnist"), download=False).setup()
    errors.append(err.value)

    offline = tmp_path / "debian"
    offline.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        with gzip.open(offline / f"{name}.gz", "wb") as f:
            f.write(b"\x00" * 16)
    (offline / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    monkeypatch.setattr(FashionMNISTDataModule, "offline_dirs", (str(offline),))
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte.gz is corrupt") as err:
        FashionMNISTDataModule(data_dir=str(tmp_path / "fashion"), download=False).setup()
    errors.append(err.value)
    for error in errors:
        _one_line(error)


# ---------------------------------------------------------------------------------------------------------------
# Determinism


def _short_run(name: str, seed: int, dm: DigitsDataModule, **trainer_kwargs) -> tuple[WatermarkScheme, Verdict]:
    scheme = _scheme(name, seed=seed)
    L.seed_everything(0)
    model = _model(name)
    fast_trainer(1, [scheme], limit_train_batches=4, limit_val_batches=0, **trainer_kwargs).fit(model, dm)
    return scheme, scheme.verify(model.eval())


@pytest.mark.parametrize("name", slow_if_from_gradients(PARAMS))
def test_the_same_seed_gives_the_same_key_and_verdict(name: str, dm: DigitsDataModule) -> None:
    first, first_verdict = _short_run(name, 7, dm)
    second, second_verdict = _short_run(name, 7, dm)
    assert first.key.fingerprint() == second.key.fingerprint()
    assert first_verdict == second_verdict
    other, _ = _short_run(name, 8, dm)
    assert other.key.fingerprint() != first.key.fingerprint()


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision


_EMBED_EPOCHS = {"uchida": 3, "content": 6, "noise": 6, "unrelated": 6, "new_label": 6, "usp": 12, "csp": 12}


@pytest.mark.slow
@pytest.mark.parametrize("name", PARAMS)
def test_bf16_mixed_embeds_every_scheme(name: str, dm: DigitsDataModule) -> None:
    scheme = _scheme(name, seed=1)
    if name == "csp":
        scheme = CSPWatermark(customers=2, seed=1, num_queries=2000)
    L.seed_everything(0)
    model = _model(name, width=16)
    trainer = fast_trainer(
        _EMBED_EPOCHS.get(name, registry.scheme(name).example_epochs),
        [scheme],
        precision="bf16-mixed",
        num_sanity_val_steps=0,
    )
    trainer.fit(model, dm)
    verdict = scheme.verify(model.eval())
    assert verdict.is_watermarked, verdict


# ---------------------------------------------------------------------------------------------------------------
# Distributed: 2 CPU processes (gloo) against one process with the same effective batch (2 ranks x 32 = 64), so
# both runs take the same number of optimizer steps. The trigger-set key sharding is checked in
# test_trigger_set.py.


def _runs() -> dict[str, dict]:
    """One process, then two (a fresh strategy object per Trainer)."""
    return {"single": {"devices": 1}, "ddp": {"strategy": ExitingDDPSpawn(), "devices": 2}}


def _per_rank_batch(kwargs: dict) -> int:
    return 64 // kwargs["devices"]


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("name", PARAMS)
def test_every_scheme_under_two_process_ddp_gives_the_single_process_verdict(
    name: str, tmp_path: Path, clean_models: dict[int, ImageClassifier]
) -> None:
    keys, models = {}, {}
    for label, kwargs in _runs().items():
        key_path = tmp_path / f"{label}.key"
        scheme = _scheme(name, seed=1, key_path=key_path)
        L.seed_everything(0)
        model = _model(name)
        trainer = fast_trainer(registry.scheme(name).example_epochs, [scheme], num_sanity_val_steps=0, **kwargs)
        trainer.fit(model, DigitsDataModule(batch_size=_per_rank_batch(kwargs)))
        keys[label], models[label] = load_key(key_path), model.eval()
    if name != "usp":  # USP's detector (part of its key) is trained with the model; the others are drawn before
        assert keys["ddp"].fingerprint() == keys["single"].fingerprint()
    for label in ("single", "ddp"):
        verdict = keys[label].verify(models[label], alpha=ALPHA)
        assert verdict.is_watermarked, (label, verdict)
        innocent = {s: keys[label].verify(clean, alpha=ALPHA) for s, clean in clean_models.items()}
        declared = sum(v.is_watermarked for v in innocent.values())
        assert_innocent(len(innocent), declared, min(v.p_value for v in innocent.values()), ALPHA, (label, innocent))


def _attack(name: str, victim: ImageClassifier) -> L.LightningModule:
    adam = partial(torch.optim.Adam, lr=1e-3)
    return {
        "fine_tune": lambda: FineTuneAttack(victim, mode="FTAL", optimizer=partial(torch.optim.SGD, lr=0.01)),
        "prune": lambda: PruneAttack(victim, rate=0.5, scope="global", optimizer=partial(torch.optim.SGD, lr=0.01)),
        "distillation": lambda: DistillationAttack(victim, MLP(64, 10), temperature=3.0, optimizer=adam),
        "overwrite": lambda: OverwriteAttack(
            victim, UchidaWatermark(layer="conv2", bits=64, strength=0.1, seed=99), optimizer=adam
        ),
        "evasion": lambda: EvasionAttack(victim, optimizer=adam),
    }[name]()


# each attack against a scheme it is meant for: weight attacks on the white-box mark, query attacks on trigger keys
ATTACKED_SCHEME = {
    "fine_tune": "uchida",
    "prune": "uchida",
    "overwrite": "uchida",
    "distillation": "content",
    "evasion": "content",
}


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("name", list(ATTACKED_SCHEME))
def test_every_attack_under_two_process_ddp_gives_the_single_process_verdict(
    name: str, marked: Callable[[str], Marked]
) -> None:
    m = marked(ATTACKED_SCHEME[name])
    verdicts = {}
    for label, kwargs in _runs().items():
        L.seed_everything(0)
        attack = _attack(name, m.model)
        before = {k: v.clone() for k, v in attack.state_dict().items()}
        data = DigitsDataModule(batch_size=_per_rank_batch(kwargs), train_split="attacker")
        fast_trainer(2, num_sanity_val_steps=0, **kwargs).fit(attack, data)
        changed = [k for k, v in attack.state_dict().items() if k in before and not torch.equal(v, before[k])]
        assert changed, (label, "the attack trained")
        verdicts[label] = m.key.verify(attack.eval(), alpha=ALPHA)
    assert verdicts["ddp"].is_watermarked == verdicts["single"].is_watermarked, verdicts
