"""Trigger-set watermarks: Zhang et al. 2018 (content, noise, unrelated keys) and Zhong et al. 2020 (new label)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import ExitingDDPSpawn, fast_trainer
from torch import nn

from lightning_wm import ImageClassifier
from lightning_wm.cli import main as cli_main
from lightning_wm.data import DigitsDataModule, FashionMNISTDataModule
from lightning_wm.models import SmallCNN
from lightning_wm.verify import load_key
from lightning_wm.watermarks import (
    ContentTrigger,
    NewLabelTrigger,
    NoiseTrigger,
    TriggerSetWatermark,
    UnrelatedTrigger,
)
from lightning_wm.watermarks.key_samples import render_text
from lightning_wm.watermarks.trigger_set import KeyCycler, TriggerSetKey, shard_indices

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EPOCHS = 6
KEY_RATIO = 0.5

GENERATORS = {
    "content": lambda: ContentTrigger(),
    "noise": lambda: NoiseTrigger(sigma=0.5),
    "unrelated": lambda: UnrelatedTrigger(source="sample_photos"),
    "new_label": lambda: NewLabelTrigger(beta=0.2),
}


def _trainer(max_epochs: int, callbacks: list | None = None, **kwargs) -> L.Trainer:
    return fast_trainer(max_epochs, callbacks, **{"num_sanity_val_steps": 0, "limit_val_batches": 0, **kwargs})


def _classifier(outputs: int, classes: int = 10, width: int = 16, in_channels: int = 1) -> ImageClassifier:
    return ImageClassifier(SmallCNN(in_channels, outputs, width=width), num_classes=classes)


def _fit(
    datamodule: L.LightningDataModule, scheme: TriggerSetWatermark | None, outputs: int, epochs: int, seed: int = 0
) -> ImageClassifier:
    L.seed_everything(seed)
    model = _classifier(outputs)
    _trainer(epochs, [scheme] if scheme is not None else []).fit(model, datamodule)
    return model


@pytest.fixture(scope="module")
def clean_models() -> dict[int, ImageClassifier]:
    """Unmarked models trained like the marked ones (same seed and epochs), with 10 and with 11 outputs."""
    datamodule = DigitsDataModule(batch_size=64)
    return {outputs: _fit(datamodule, None, outputs, EPOCHS) for outputs in (10, 11)}


@pytest.fixture(scope="module")
def marked_models() -> Callable[[str, int], tuple[TriggerSetWatermark, ImageClassifier]]:
    """Marked models per generator and key seed, trained once per module on first use."""
    cache: dict[tuple[str, int], tuple[TriggerSetWatermark, ImageClassifier]] = {}

    def get(name: str, seed: int = 1) -> tuple[TriggerSetWatermark, ImageClassifier]:
        if (name, seed) not in cache:
            scheme = TriggerSetWatermark(GENERATORS[name](), num_keys=40, key_ratio=KEY_RATIO, seed=seed)
            outputs = 11 if name == "new_label" else 10
            cache[name, seed] = scheme, _fit(DigitsDataModule(batch_size=64), scheme, outputs, EPOCHS)
        return cache[name, seed]

    return get


class _Constant(nn.Module):
    """A suspect that answers one class to everything."""

    def __init__(self, outputs: int, answer: int) -> None:
        super().__init__()
        self.outputs, self.answer = outputs, answer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), self.outputs)
        logits[:, self.answer] = 1.0
        return logits


def _key_queries(key: TriggerSetKey) -> int:
    splits = [f"{split}_labels" for split in ("verify", "null", "probe")]
    return sum(len(key.tensors[name]) for name in splits if name in key.tensors)


@pytest.mark.parametrize("name", list(GENERATORS))
def test_marked_model_is_declared_and_innocent_models_are_not(
    name: str, marked_models: Callable, clean_models: dict[int, ImageClassifier]
) -> None:
    scheme, marked = marked_models(name)
    outputs = 11 if name == "new_label" else 10

    verdict = scheme.key.verify(marked, alpha=0.01)
    assert verdict.is_watermarked, verdict
    assert verdict.statistic >= 0.5
    assert verdict.queries == _key_queries(scheme.key)
    assert verdict.details["queries_to_significance"] > 0
    assert verdict.null_draws is None

    torch.manual_seed(0)
    _, other = marked_models(name, seed=2)
    innocents = {
        "clean": clean_models[outputs],
        "constant": _Constant(outputs, outputs - 1),
        "constant 0": _Constant(outputs, 0),
        "untrained": SmallCNN(1, outputs, width=16),
        "marked with another key": other,
    }
    for what, suspect in innocents.items():
        innocent = scheme.key.verify(suspect, alpha=0.01)
        assert not innocent.is_watermarked, (what, innocent)
        assert innocent.log10_p > -3 or innocent.is_undecidable, (what, innocent)
    assert scheme.key.verify(innocents["constant 0"]).is_undecidable
    assert "near-constant" in scheme.key.verify(innocents["constant 0"]).reason


@pytest.mark.parametrize("name", ["content", "noise", "unrelated"])
def test_two_keys_of_one_generator_agree_on_labels_at_chance(name: str, dm: DigitsDataModule) -> None:
    keys = []
    for seed in (11, 12):
        scheme = TriggerSetWatermark(GENERATORS[name](), num_keys=300, seed=seed)
        keys.append(scheme.make_key(SimpleNamespace(datamodule=dm), SimpleNamespace(num_classes=10)))
    first, second = (k.tensors["embed_labels"] for k in keys)
    assert 0.03 < float((first == second).float().mean()) < 0.2
    assert first.bincount(minlength=10).min() > 10, "labels are spread over the classes"
    assert keys[0].config["verified_on"] == "embedded keys"
    secrets = [name for name in keys[0].tensors if name.startswith("generator_")]
    for secret in secrets:
        assert not torch.equal(keys[0].tensors[secret], keys[1].tensors[secret]), secret


def test_zhangs_plain_test_stamp_to_one_class_still_works(dm: DigitsDataModule) -> None:
    generator = ContentTrigger(text="TEST", target_class=0, secret=False)
    scheme = TriggerSetWatermark(generator, num_keys=40, num_verify=40, seed=1)
    model = _fit(dm, scheme, 10, 3)
    key = scheme.key
    assert key.config["verified_on"] == "held-out keys"
    assert key.config["text"] == "TEST"
    assert key.config["key_label"] == 0
    assert set(key.tensors["verify_labels"].tolist()) == {0}
    verdict = key.verify(model)
    assert verdict.is_watermarked, verdict
    assert "not valid for every suspect" in verdict.null
    assert verdict.details["queries_to_significance"] <= 10


def test_sample_photos_replace_fashion_mnist_when_it_is_missing(
    dm: DigitsDataModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FashionMNISTDataModule, "offline_dirs", ())
    scheme = TriggerSetWatermark(UnrelatedTrigger(data_dir=str(tmp_path)), num_keys=30, seed=4)
    key = scheme.make_key(SimpleNamespace(datamodule=dm), SimpleNamespace(num_classes=10))
    assert key.config["source"] == "auto"
    assert key.config["source_used"] == "sample_photos"
    images = dm.denormalize(key.tensors["embed_inputs"])
    assert images.shape == (30, 1, 8, 8)
    assert images.flatten(1).std(dim=1).min() > 0, "patches of photographs, not blank images"
    assert len({tuple(image.flatten().tolist()) for image in images}) == 30
    assert key.verify(_Constant(10, 0)).details["source"] == "sample_photos"
    with pytest.raises(ValueError, match="no classes"):
        UnrelatedTrigger(source="sample_photos", source_class=1)


def test_new_label_keys_carry_the_new_class_and_never_embedded_null_keys(dm: DigitsDataModule) -> None:
    scheme = TriggerSetWatermark(NewLabelTrigger(alpha_fraction=0.1), num_verify=20, seed=3)
    _trainer(1, [scheme], limit_train_batches=1).fit(_classifier(11), dm)
    key = scheme.key
    num_keys = round(0.1 * len(dm.train_dataset))
    assert set(key.tensors["embed_labels"].tolist()) == {10} == set(key.tensors["null_labels"].tolist())
    assert len(key.tensors["embed_labels"]) == num_keys == len(key.tensors["null_labels"])
    assert torch.equal(key.tensors["verify_inputs"], key.tensors["embed_inputs"])
    assert key.config["null_test"] == "fisher"
    delta = key.tensors["generator_delta"]
    assert delta.shape == (2 * num_keys, 1, 8, 8)
    assert delta.abs().eq(1).all()
    assert not (delta[:1] == delta[1:]).flatten(1).all(1).any(), "every key has its own perturbation"
    embedded = key.tensors["embed_inputs"].flatten(1)
    assert not (embedded[:, None] == key.tensors["null_inputs"].flatten(1)[None]).all(2).any()


def test_probes_are_held_out_task_inputs_with_their_labels(dm: DigitsDataModule) -> None:
    scheme = TriggerSetWatermark(ContentTrigger(), num_keys=20, num_probes=50, seed=0)
    key = scheme.make_key(SimpleNamespace(datamodule=dm), SimpleNamespace(num_classes=10))
    val_inputs, val_labels = dm.dataset("val").tensors
    probes = key.tensors["probe_inputs"]
    assert len(probes) == 50
    match = (probes.flatten(1)[:, None] == val_inputs.flatten(1)[None]).all(2)
    assert match.any(1).all()
    assert torch.equal(val_labels[match.float().argmax(1)], key.tensors["probe_labels"])


def test_shard_indices_split_the_keys_among_ranks_without_overlap() -> None:
    shards = [shard_indices(10, rank, 3) for rank in range(3)]
    assert [s.tolist() for s in shards] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="cannot be shared"):
        shard_indices(2, 0, 4)


def test_key_cycler_visits_its_whole_shard_before_repeating() -> None:
    shard = shard_indices(20, 1, 2)
    cycler = KeyCycler(shard, seed=0)
    first_pass = torch.cat([cycler.take(3) for _ in range(3)] + [cycler.take(1)])
    assert sorted(first_pass.tolist()) == shard.tolist()
    second_pass = cycler.take(10)
    assert sorted(second_pass.tolist()) == shard.tolist()


def test_each_rank_injects_only_its_own_shard(dm: DigitsDataModule) -> None:
    generator = ContentTrigger(target_class=0)
    scheme = TriggerSetWatermark(generator, num_keys=12, num_verify=4, keys_per_batch=3, seed=0)
    _trainer(1, [scheme], limit_train_batches=1).fit(_classifier(10), dm)
    keys = scheme.key.tensors["embed_inputs"]
    for rank in range(2):
        scheme._cycler = None
        fake_trainer = SimpleNamespace(global_rank=rank, world_size=2)
        seen = []
        for _ in range(2):
            x, y = torch.zeros(5, *keys.shape[1:]), torch.full((5,), 7)
            batch = [x, y]
            scheme.on_train_batch_start(fake_trainer, None, batch, 0)
            assert batch[0].shape[0] == 8
            assert batch[1][:5].eq(7).all()
            assert batch[1][5:].eq(0).all()
            injected = batch[0][5:]
            seen += [int((keys == k).flatten(1).all(1).nonzero()) for k in injected]
        assert sorted(seen) == list(range(rank, 12, 2))


class _BatchSizes(L.Callback):
    def __init__(self) -> None:
        self.sizes: dict[str, list[int]] = {"train": [], "val": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.sizes["train"].append(len(batch[0]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.sizes["val"].append(len(batch[0]))


def test_keys_enter_training_batches_only(dm: DigitsDataModule) -> None:
    sizes = _BatchSizes()
    scheme = TriggerSetWatermark(ContentTrigger(), num_keys=20, num_verify=10, keys_per_batch=5, seed=0)
    trainer = _trainer(1, [scheme, sizes], limit_train_batches=2, limit_val_batches=2)
    trainer.fit(_classifier(10), dm)
    assert sizes.sizes["train"] == [64 + 5, 64 + 5]
    assert sizes.sizes["val"] == [64, 64]


def test_batch_that_is_not_a_mutable_list_is_a_clear_error(dm: DigitsDataModule) -> None:
    scheme = TriggerSetWatermark(ContentTrigger(), num_keys=8, num_verify=4, seed=0)
    _trainer(1, [scheme], limit_train_batches=1).fit(_classifier(10), dm)
    with pytest.raises(TypeError, match=r"list \[x, y, \.\.\.\]"):
        scheme.on_train_batch_start(SimpleNamespace(global_rank=0, world_size=1), None, (torch.zeros(2), None), 0)


def test_checkpoint_holds_no_key_tensor(dm: DigitsDataModule, tmp_path: Path) -> None:
    scheme = TriggerSetWatermark(ContentTrigger(), num_keys=20, num_verify=20, seed=0, key_path=str(tmp_path / "k"))
    trainer = _trainer(1, [scheme])
    trainer.fit(_classifier(10), dm)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    checkpoint = torch.load(tmp_path / "model.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["callbacks"], "the scheme's fingerprint should be in the checkpoint"

    images = [t for name, t in scheme.key.tensors.items() if name.endswith("_inputs")]
    secrets = list(scheme.key.tensors.values())
    for tensor in _all_tensors(checkpoint):
        for secret in secrets:
            assert not (tensor.shape == secret.shape and torch.equal(tensor, secret))
        for image_set in images:
            if tensor.dim() >= 3 and tuple(tensor.shape[-3:]) == tuple(image_set.shape[1:]):
                flat = tensor.reshape(-1, *image_set.shape[1:]).float()
                assert not (flat[:, None] == image_set[None]).flatten(2).all(2).any()


def _all_tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in _all_tensors(value)]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in _all_tensors(value)]
    return []


def test_new_label_with_k_outputs_says_what_to_set(dm: DigitsDataModule) -> None:
    scheme = TriggerSetWatermark(NewLabelTrigger(alpha_fraction=0.05), seed=0)
    with pytest.raises(ValueError, match=r"K\+1 = 11 outputs.*num_classes to 11"):
        _trainer(1, [scheme], limit_train_batches=1).fit(_classifier(10), dm)


@pytest.mark.parametrize(
    ("patch", "message"),
    [(torch.ones(3, 3, 3), "3 channels, the images have 1"), (torch.ones(10, 4), "does not fit"), (torch.ones(2), "")],
)
def test_trigger_patch_of_the_wrong_shape_is_a_clear_error(
    patch: torch.Tensor, message: str, dm: DigitsDataModule
) -> None:
    scheme = TriggerSetWatermark(ContentTrigger(patch=patch), num_keys=8, num_verify=8, seed=0)
    with pytest.raises(ValueError, match=message or "must be"):
        _trainer(1, [scheme], limit_train_batches=1).fit(_classifier(10), dm)


def test_content_trigger_stamps_text_or_patch_and_rejects_unknown_letters(dm: DigitsDataModule) -> None:
    assert render_text("TEST").shape == (5, 15)
    pixels, mask = ContentTrigger(patch=torch.full((1, 2, 2), 0.5), position=(0, 0)).stamp((1, 8, 8))
    assert mask.sum() == 4
    assert pixels[0, :2, :2].eq(0.5).all()
    with pytest.raises(ValueError, match="A-Z"):
        ContentTrigger(text="T3ST")
    with pytest.raises(ValueError, match="pass rng"):
        ContentTrigger().stamp((1, 8, 8))
    rng = torch.Generator().manual_seed(0)
    first, second = (ContentTrigger().stamp((1, 28, 28), rng) for _ in range(2))
    assert not torch.equal(first[0] * first[1], second[0] * second[1]), "each key draws its own secret stamp"


def test_content_trigger_on_a_dark_box_is_visible_on_bright_images() -> None:
    """White strokes vanish on a white garment; on a dark box they show on any image."""
    bright = torch.ones(1, 28, 28)
    for background, visible in ((None, False), (0.0, True)):
        pixels, mask = ContentTrigger(text="TEST", background=background, secret=False).stamp((1, 28, 28))
        stamped = bright * (1 - mask) + pixels * mask
        assert (not torch.equal(stamped, bright)) == visible, background
    pixels, mask = ContentTrigger(text="TEST", background=0.0, secret=False).stamp((1, 28, 28))
    box = mask.bool()
    assert pixels[box].eq(1.0).any()
    assert pixels[box].eq(0.0).any()
    assert int(box.sum()) == int(box.any(dim=1).sum()) * int(box.any(dim=2).sum()), "the box is a rectangle"


def test_key_file_round_trip_verifies_the_same(dm: DigitsDataModule, tmp_path: Path) -> None:
    key_path = tmp_path / "owner.key"
    scheme = TriggerSetWatermark(NoiseTrigger(), num_keys=40, num_verify=40, seed=5, key_path=str(key_path))
    model = _fit(dm, scheme, 10, 3)
    loaded = load_key(key_path)
    assert isinstance(loaded, TriggerSetKey)
    assert loaded.fingerprint() == scheme.key.fingerprint()
    direct, reloaded = scheme.key.verify(model), loaded.verify(model)
    assert (direct.statistic, direct.p_value) == (reloaded.statistic, reloaded.p_value)

    labels_only = loaded.verify(lambda x: model.eval()(x).argmax(-1))
    assert labels_only.statistic == direct.statistic
    assert labels_only.queries == _key_queries(loaded) == 40 + 100

    again = TriggerSetWatermark(NoiseTrigger(), num_keys=40, num_verify=40, seed=99, key_path=str(key_path))
    _trainer(1, [again], limit_train_batches=1).fit(_classifier(10), dm)
    assert again.key.fingerprint() == loaded.fingerprint()


def test_config_runs_through_the_cli_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """``lightning-wm fit`` with the new-label config, then ``lightning-wm verify`` of its checkpoint with its key
    file: declared watermarked, from the embedded keys against as many never-embedded null keys."""
    monkeypatch.chdir(tmp_path)
    config = str(CONFIGS / "digits" / "new_label.yaml")
    seeded = "--watermarks.new_label.init_args.seed=1"  # 5 epochs: key accuracy 0.86 to 1 over seeds 0-3
    cli_main(["fit", "--config", config, "--trainer.max_epochs=5", seeded, "--trainer.enable_progress_bar=false"])
    key_file = tmp_path / "outputs" / "digits" / "new_label.key"
    assert key_file.is_file()
    checkpoint = next((tmp_path / "outputs").rglob("last.ckpt"))
    cli_main(["verify", "--config", config, "--key", str(key_file), "--ckpt_path", str(checkpoint)])
    verdict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert verdict["scheme"] == "trigger_set"
    assert verdict["is_watermarked"] is True, verdict
    assert verdict["queries"] == _key_queries(load_key(key_file))
    assert verdict["details"]["null_keys"] == verdict["details"]["keys"]


class _ShardRecordingTriggerSet(TriggerSetWatermark):
    """Writes each rank's key shard to a file, to check the sharding inside real DDP processes."""

    def __init__(self, record_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.record_dir = record_dir

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        shard = self._cycler.shard.tolist()  # type: ignore[union-attr]
        (Path(self.record_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(shard))


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_ddp_shards_the_keys_and_embeds_the_watermark(tmp_path: Path) -> None:
    key_path = tmp_path / "ddp.key"
    scheme = _ShardRecordingTriggerSet(
        str(tmp_path), generator=ContentTrigger(), num_keys=40, num_verify=40, seed=1, key_path=str(key_path)
    )
    L.seed_everything(0)
    model = _classifier(10)
    trainer = _trainer(EPOCHS, [scheme], strategy=ExitingDDPSpawn(), devices=2)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    shards = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert shards == [list(range(0, 40, 2)), list(range(1, 40, 2))]
    assert load_key(key_path).verify(model).is_watermarked


class _LookupSuspect(nn.Module):
    """Answers each input it knows with its stored class (logits of a one-hot), class 0 for any other."""

    def __init__(self, known: dict[bytes, int], classes: int = 10) -> None:
        super().__init__()
        self.known, self.classes = known, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        answers = torch.tensor([self.known.get(row.numpy().tobytes(), 0) for row in x.cpu()])
        return nn.functional.one_hot(answers, self.classes).float()


def test_a_draw_of_labels_favouring_a_class_accuses_no_model_favouring_it(dm: DigitsDataModule) -> None:
    """Random labels that happen to favour class 0 (30 of 100: a draw the binomial's p-value calls 1 in 10^8) and a
    model that answers 0 to every key image, and every clean probe right: Binomial(100, 1/10) alone would declare
    it; the permutation test of the labels drawn sees no evidence (every order of those labels gives 30 hits)."""
    scheme = TriggerSetWatermark(ContentTrigger(), num_keys=100, num_verify=100, seed=3)
    key = scheme.make_key(SimpleNamespace(datamodule=dm), SimpleNamespace(num_classes=10))
    labels = key.tensors["verify_labels"].clone()
    labels[labels == 0] = 1
    labels[:30] = 0
    key.tensors["verify_labels"] = labels
    probes = {x.numpy().tobytes(): int(y) for x, y in zip(key.tensors["probe_inputs"], key.tensors["probe_labels"])}
    verdict = key.verify(_LookupSuspect(probes))
    assert verdict.details["hits"] == 30
    assert verdict.details["log10_p_binomial"] < math.log10(0.01), "the binomial alone would accuse this model"
    assert verdict.details["log10_p_permutation"] == 0.0
    assert verdict.outcome.value == "not watermarked", verdict

    answers = {x.numpy().tobytes(): int(y) for x, y in zip(key.tensors["verify_inputs"], labels)}
    marked = key.verify(_LookupSuspect({**probes, **answers}))
    assert marked.is_watermarked, marked
    assert marked.p_value < 1e-60, marked
