"""Reliability and security of every scheme (issue 9) on the digits data with tiny models (SmallCNN, width 8):
resume keeps the key, no checkpoint holds a key tensor, key files are checked, bad input is a one-line error,
seeds make keys and verdicts reproducible, bf16-mixed trains, unmarked models are not declared, and 2-process
CPU DDP trains and verifies (slow).

Fast: ``pytest tests/test_reliability.py``. Slow: ``pytest -m slow tests/test_reliability.py``; set
``LIGHTNING_WM_RESULTS=<folder>`` to write the measured false-positive rates there as JSON.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import fast_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_wm import ImageClassifier
from lightning_wm.attacks import DistillationAttack, EvasionAttack, FineTuneAttack, OverwriteAttack, PruneAttack
from lightning_wm.data import (
    CIFAR10DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
)
from lightning_wm.models import MLP, SmallCNN
from lightning_wm.verify import KEY_FORMAT_VERSION, KeyFileError, Verdict, WatermarkKey, load_key
from lightning_wm.watermarks import (
    ContentTrigger,
    CSPWatermark,
    NewLabelTrigger,
    NoiseTrigger,
    TriggerSetWatermark,
    UchidaWatermark,
    UnrelatedTrigger,
    USPWatermark,
    WatermarkScheme,
)

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 8
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


def _scheme(name: str, seed: int | None, key_path: Path | None = None, target: int = 0) -> WatermarkScheme:
    path = str(key_path) if key_path is not None else None
    trigger = partial(TriggerSetWatermark, num_keys=40, num_verify=40, seed=seed, key_path=path)
    text = "TEST" if target == 0 else "KEY"
    return {
        "uchida": lambda: UchidaWatermark(layer="conv2", bits=64, strength=0.1, seed=seed, key_path=path),
        "content": lambda: trigger(ContentTrigger(target_class=target, text=text)),
        "noise": lambda: trigger(NoiseTrigger(target_class=target, sigma=0.5)),
        "unrelated": lambda: trigger(UnrelatedTrigger(target_class=target, data_dir=FASHION_DIR or "data")),
        "new_label": lambda: trigger(NewLabelTrigger(beta=0.2, alpha_fraction=0.05)),
        "usp": lambda: USPWatermark(seed=seed, num_queries=300, key_path=path),
        "csp": lambda: CSPWatermark(customers=2, seed=seed, num_queries=500, key_path=path),
    }[name]()


SCHEMES = ["uchida", "content", "noise", "unrelated", "new_label", "usp", "csp"]
PARAMS = [
    pytest.param(n, marks=pytest.mark.skipif(FASHION_DIR is None, reason="no Fashion-MNIST for unrelated keys"))
    if n == "unrelated"
    else n
    for n in SCHEMES
]


def _outputs(name: str) -> int:
    return 11 if name == "new_label" else 10


def _model(name: str = "uchida", width: int = WIDTH) -> ImageClassifier:
    return ImageClassifier(SmallCNN(1, _outputs(name), width), num_classes=10)


class Marked:
    """A scheme, the model it marked, its key file and every checkpoint written while and after training."""

    def __init__(self, name: str, root: Path, dm: DigitsDataModule) -> None:
        self.name = name
        self.root = root
        self.key_path = root / f"{name}.key"
        self.scheme = _scheme(name, seed=1, key_path=self.key_path)
        L.seed_everything(0)
        self.model = _model(name)
        full = ModelCheckpoint(dirpath=root / "full", save_last=True, every_n_train_steps=10, save_top_k=-1)
        weights = ModelCheckpoint(dirpath=root / "weights", save_weights_only=True, save_last=True)
        epochs = SCHEME_EPOCHS.get(name, EPOCHS)
        trainer = fast_trainer(epochs, [self.scheme, full, weights], enable_checkpointing=True)
        trainer.fit(self.model, dm)
        trainer.save_checkpoint(root / "saved.ckpt")
        trainer.save_checkpoint(root / "saved_weights.ckpt", weights_only=True)
        attack = FineTuneAttack(self.model, mode="FTAL", optimizer=partial(torch.optim.SGD, lr=0.01))
        attack_ckpt = ModelCheckpoint(dirpath=root / "attack", save_last=True)
        attack_dm = DigitsDataModule(batch_size=64, train_split="attacker")
        fast_trainer(1, [attack_ckpt], enable_checkpointing=True, limit_train_batches=2).fit(attack, attack_dm)
        self.model.eval()

    @property
    def key(self) -> WatermarkKey:
        return self.scheme.key

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*.ckpt"))


@pytest.fixture(scope="module")
def marked(tmp_path_factory, dm: DigitsDataModule) -> Callable[[str], Marked]:
    cache: dict[str, Marked] = {}

    def get(name: str) -> Marked:
        if name not in cache:
            cache[name] = Marked(name, tmp_path_factory.mktemp(name), dm)
        return cache[name]

    return get


def _clean(seed: int, outputs: int, dm: DigitsDataModule) -> ImageClassifier:
    L.seed_everything(seed)
    model = ImageClassifier(SmallCNN(1, outputs, WIDTH), num_classes=10)
    fast_trainer(EPOCHS, limit_val_batches=0).fit(model, dm)
    return model.eval()


@pytest.fixture(scope="module")
def clean_models(dm: DigitsDataModule) -> dict[int, ImageClassifier]:
    """Unmarked models trained like the marked ones (same architecture, epochs and data), other seeds."""
    return {seed: _clean(seed, 10, dm) for seed in FAST_NULL_SEEDS}


# ---------------------------------------------------------------------------------------------------------------
# Key secrecy


def _all_tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in _all_tensors(value)]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in _all_tensors(value)]
    return []


def _contains(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    """Whether the values of ``needle`` occur, contiguous and in order, among the values of ``haystack``."""
    hay = haystack.detach().flatten().float()
    pin = needle.detach().flatten().float()
    if len(pin) == 0 or len(hay) < len(pin):
        return False
    starts = (hay[: len(hay) - len(pin) + 1] == pin[0]).nonzero().flatten()
    return any(torch.equal(hay[s : s + len(pin)], pin) for s in starts[:10_000].tolist())


def _secret_pieces(key: WatermarkKey) -> dict[str, torch.Tensor]:
    """Each key tensor, and for stacks of samples (trigger images, queries, projections) their first rows too,
    so that a checkpoint holding a single trigger image or a slice is caught. Tensors of fewer than 4 values
    (a class index, a frequency) or of one repeated value (the key label of every trigger) are too small a
    secret to tell apart from a model's own numbers (and the label is in the key's config anyway)."""
    pieces = {}
    for name, tensor in key.tensors.items():
        if tensor.numel() < 4 or bool((tensor == tensor.flatten()[0]).all()):
            continue
        pieces[name] = tensor
        if tensor.dim() >= 2 and len(tensor) > 1:
            for i in range(min(3, len(tensor))):
                if tensor[i].numel() >= 4:
                    pieces[f"{name}[{i}]"] = tensor[i]
    return pieces


def _leaks(checkpoint: dict, key: WatermarkKey) -> list[str]:
    tensors = _all_tensors(checkpoint)
    return [name for name, piece in _secret_pieces(key).items() if any(_contains(t, piece) for t in tensors)]


def test_the_leak_detector_finds_a_key_tensor_hidden_in_a_checkpoint(marked: Callable[[str], Marked]) -> None:
    m = marked("content")
    checkpoint = torch.load(m.root / "saved.ckpt", map_location="cpu", weights_only=True)
    assert not _leaks(checkpoint, m.key)
    image = m.key.tensors["verify_inputs"][2]
    checkpoint["state_dict"]["backbone.extra"] = torch.cat([torch.randn(7), image.flatten(), torch.randn(3)])
    assert _leaks(checkpoint, m.key) == ["verify_inputs[2]"]


@pytest.mark.parametrize("name", PARAMS)
def test_no_checkpoint_holds_a_key_tensor(name: str, marked: Callable[[str], Marked]) -> None:
    m = marked(name)
    checkpoints = m.checkpoints()
    kinds = {p.parent.name for p in checkpoints}
    assert kinds >= {"full", "weights", "attack"}, checkpoints
    assert len(checkpoints) >= 6
    assert _secret_pieces(m.key), "the key has tensors to look for"
    for path in checkpoints:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert _leaks(checkpoint, m.key) == [], f"{path} holds key tensors"
    full = torch.load(m.root / "saved.ckpt", map_location="cpu", weights_only=True)
    state = full["callbacks"][m.scheme.state_key]
    assert set(state) == {"fingerprint", "key_path"}, "what resuming needs: which key, and where it lives"
    assert load_key(m.key_path).fingerprint() == m.key.fingerprint()


# ---------------------------------------------------------------------------------------------------------------
# Resume


class _Killed(Exception):
    pass


class _KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise _Killed


@pytest.mark.parametrize("name", ["uchida", "content", "usp"])
def test_resume_mid_epoch_keeps_the_key_and_the_watermark(name: str, tmp_path: Path, dm: DigitsDataModule) -> None:
    key_path = tmp_path / "owner.key"
    checkpoints = tmp_path / "ckpt"

    def run(scheme: WatermarkScheme, epochs: int, callbacks: list, ckpt_path: str | None) -> ImageClassifier:
        L.seed_everything(0)
        model = _model(name)
        every = ModelCheckpoint(dirpath=checkpoints, save_last=True, every_n_train_steps=5, save_top_k=-1)
        trainer = fast_trainer(epochs, [scheme, every, *callbacks], enable_checkpointing=True)
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model

    first = _scheme(name, seed=None, key_path=key_path)
    with pytest.raises(_Killed):
        run(first, 8, [_KillAt(20)], None)  # 14 steps per epoch: killed in the middle of the second epoch
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 15
    assert last["callbacks"][first.state_key]["fingerprint"]

    again = _scheme(name, seed=None, key_path=key_path)  # no seed: the key can only come from the key file
    epochs = 8 if name == "usp" else 4
    model = run(again, epochs, [], "last")
    assert again.key.fingerprint() == load_key(key_path).fingerprint()
    if name != "usp":  # USP's key holds the detector, which keeps training: its identity is the query set
        assert again.key.fingerprint() == first.key.fingerprint()
    final = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["epoch"] == epochs - 1
    # Lightning replays a mid-epoch resume of a plain DataLoader from the epoch's start, counting a step or two
    # fewer than an uninterrupted run
    assert 14 * epochs - 3 <= final["global_step"] <= 14 * epochs
    verdict = load_key(key_path).verify(model.eval())
    assert verdict.is_watermarked, verdict

    other = tmp_path / "other.key"
    load_key(key_path)  # the original still loads
    stranger = _scheme(name, seed=12345, key_path=other)
    with pytest.raises(RuntimeError, match="resume with the original key_path"):
        run(stranger, epochs + 1, [], str(checkpoints / "last.ckpt"))


# ---------------------------------------------------------------------------------------------------------------
# Key integrity


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


@pytest.mark.parametrize("name", PARAMS)
def test_the_wrong_key_says_not_watermarked(name: str, marked: Callable[[str], Marked], dm: DigitsDataModule) -> None:
    """Another owner's key of the same scheme. For trigger sets that means another key label (and, for content
    keys, another stamp): a key of the same generator and label but another seed is the same watermark, since the
    model learns the stamp or the noise, not the individual images, and is rightly declared."""
    m = marked(name)
    wrong = _scheme(name, seed=2, target=3)
    L.seed_everything(1)
    epochs, batches = (SCHEME_EPOCHS[name], None) if name in SCHEME_EPOCHS else (1, 4)
    fast_trainer(epochs, [wrong], limit_train_batches=batches, limit_val_batches=0).fit(_model(name), dm)
    assert wrong.key.fingerprint() != m.key.fingerprint()
    verdict = wrong.key.verify(m.model, alpha=ALPHA)
    assert isinstance(verdict, Verdict)
    assert not verdict.is_watermarked, verdict


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


@pytest.mark.parametrize("name", PARAMS)
def test_the_same_seed_gives_the_same_key_and_verdict(name: str, dm: DigitsDataModule) -> None:
    first, first_verdict = _short_run(name, 7, dm)
    second, second_verdict = _short_run(name, 7, dm)
    assert first.key.fingerprint() == second.key.fingerprint()
    assert first_verdict == second_verdict
    other, _ = _short_run(name, 8, dm)
    assert other.key.fingerprint() != first.key.fingerprint()


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision


@pytest.mark.parametrize("name", PARAMS)
def test_bf16_mixed_on_cpu_trains_and_verifies(name: str, dm: DigitsDataModule) -> None:
    scheme, verdict = _short_run(name, 3, dm, precision="bf16-mixed")
    assert isinstance(verdict, Verdict)
    assert 0.0 <= verdict.p_value <= 1.0
    assert load_key_round_trip(scheme.key).fingerprint() == scheme.key.fingerprint()


def load_key_round_trip(key: WatermarkKey) -> WatermarkKey:
    buffer_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    path = key.save_key(buffer_dir / f"lightning_wm_bf16_{os.getpid()}.key")
    try:
        return load_key(path)
    finally:
        path.unlink()


# Settings under which each scheme is declared on digits within a few epochs (as in the scheme tests).
_EMBED_EPOCHS = {"uchida": 3, "content": 6, "noise": 6, "unrelated": 6, "new_label": 6, "usp": 12, "csp": 12}


@pytest.mark.slow
@pytest.mark.parametrize("name", PARAMS)
def test_bf16_mixed_embeds_every_scheme(name: str, dm: DigitsDataModule) -> None:
    scheme = _scheme(name, seed=1)
    if name == "csp":
        scheme = CSPWatermark(customers=2, seed=1, num_queries=2000)
    L.seed_everything(0)
    model = _model(name, width=16)
    trainer = fast_trainer(_EMBED_EPOCHS[name], [scheme], precision="bf16-mixed", num_sanity_val_steps=0)
    trainer.fit(model, dm)
    verdict = scheme.verify(model.eval())
    assert verdict.is_watermarked, verdict


# ---------------------------------------------------------------------------------------------------------------
# False positives


def _false_positives(keys: dict[str, WatermarkKey], models: dict[int, ImageClassifier]) -> dict[str, dict]:
    table = {}
    for name, key in keys.items():
        verdicts = [key.verify(model, alpha=ALPHA) for model in models.values()]
        declared = sum(v.is_watermarked for v in verdicts)
        table[name] = {
            "models": len(verdicts),
            "declared": declared,
            "rate": declared / len(verdicts),
            "min_p_value": min(v.p_value for v in verdicts),
        }
    return table


def _record(table: dict, filename: str) -> None:
    print(json.dumps(table, indent=1))
    folder = os.environ.get("LIGHTNING_WM_RESULTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / filename).write_text(json.dumps(table, indent=2))


def test_unmarked_models_are_not_declared_by_any_key(marked: Callable[[str], Marked], clean_models: dict) -> None:
    names = [n for n in SCHEMES if n != "usp" and (n != "unrelated" or FASHION_DIR is not None)]  # usp: below
    table = _false_positives({n: marked(n).key for n in names}, clean_models)
    _record(table, "issue9_false_positives_fast.json")
    assert all(row["declared"] == 0 for row in table.values()), table


def test_usp_keys_do_not_declare_unmarked_models(
    marked: Callable[[str], Marked], clean_models: dict, dm: DigitsDataModule
) -> None:
    short = USPWatermark(seed=1, num_queries=300)
    L.seed_everything(0)
    short_model = _model("usp")
    fast_trainer(EPOCHS, [short], limit_val_batches=0).fit(short_model, dm)
    table = _false_positives({"usp_3_epochs": short.key, "usp_12_epochs": marked("usp").key}, clean_models)
    _record(table, "issue9_false_positives_usp_fast.json")
    assert all(row["declared"] == 0 for row in table.values()), table
    # the key's null comes from held-out clean references (usp.py), and the unmarked models stay below it
    for key, model in ((short.key, short_model), (marked("usp").key, marked("usp").model)):
        rates = [key.verify(m).statistic for m in clean_models.values()]
        assert max(rates) < key.config["null_rate"], (rates, key.config["calibration_rates"])
        assert key.verify(model.eval(), alpha=ALPHA).is_watermarked, "while the marked model is declared"


@pytest.mark.slow
def test_ten_unmarked_models_are_not_declared_by_any_key(marked: Callable[[str], Marked], dm: DigitsDataModule) -> None:
    models = {seed: _clean(seed, 10, dm) for seed in SLOW_NULL_SEEDS}
    names = [n for n in SCHEMES if n != "unrelated" or FASHION_DIR is not None]
    keys = {n: marked(n).key for n in names}
    table = _false_positives(keys, models)
    eleven = {seed: _clean(seed, 11, dm) for seed in SLOW_NULL_SEEDS}
    table["new_label_vs_11_output_models"] = _false_positives({"new_label": keys["new_label"]}, eleven)["new_label"]
    _record(table, "issue9_false_positives_slow.json")
    assert all(row["declared"] == 0 for row in table.values()), table


# ---------------------------------------------------------------------------------------------------------------
# Distributed: 2 CPU processes (gloo) against one process with the same effective batch (2 ranks x 32 = 64), so
# both runs take the same number of optimizer steps. The trigger-set key sharding is checked in
# test_trigger_set.py.

SINGLE = {"devices": 1}
DDP = {"strategy": "ddp_spawn", "devices": 2}


def _per_rank_batch(kwargs: dict) -> int:
    return 64 // kwargs["devices"]


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("name", PARAMS)
def test_every_scheme_under_two_process_ddp_gives_the_single_process_verdict(
    name: str, tmp_path: Path, clean_models: dict[int, ImageClassifier]
) -> None:
    keys, models = {}, {}
    for label, kwargs in {"single": SINGLE, "ddp": DDP}.items():
        key_path = tmp_path / f"{label}.key"
        scheme = _scheme(name, seed=1, key_path=key_path)
        L.seed_everything(0)
        model = _model(name)
        trainer = fast_trainer(SCHEME_EPOCHS.get(name, EPOCHS), [scheme], num_sanity_val_steps=0, **kwargs)
        trainer.fit(model, DigitsDataModule(batch_size=_per_rank_batch(kwargs)))
        keys[label], models[label] = load_key(key_path), model.eval()
    if name != "usp":  # USP's detector (part of its key) is trained with the model; the others are drawn before
        assert keys["ddp"].fingerprint() == keys["single"].fingerprint()
    for label in ("single", "ddp"):
        verdict = keys[label].verify(models[label], alpha=ALPHA)
        assert verdict.is_watermarked, (label, verdict)
        declared = [s for s, clean in clean_models.items() if keys[label].verify(clean, alpha=ALPHA).is_watermarked]
        assert not declared, (label, declared)


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
    for label, kwargs in {"single": SINGLE, "ddp": DDP}.items():
        L.seed_everything(0)
        attack = _attack(name, m.model)
        before = {k: v.clone() for k, v in attack.state_dict().items()}
        data = DigitsDataModule(batch_size=_per_rank_batch(kwargs), train_split="attacker")
        fast_trainer(2, num_sanity_val_steps=0, **kwargs).fit(attack, data)
        changed = [k for k, v in attack.state_dict().items() if k in before and not torch.equal(v, before[k])]
        assert changed, (label, "the attack trained")
        verdicts[label] = m.key.verify(attack.eval(), alpha=ALPHA)
    assert verdicts["ddp"].is_watermarked == verdicts["single"].is_watermarked, verdicts
