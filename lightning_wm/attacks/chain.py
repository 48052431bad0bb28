"""Combined removal attacks: registered attacks applied one after another (the SoK's adaptive attackers combine
model modification with input preprocessing, e.g. fine-pruning then input smoothing; Lukas et al., S&P 2022)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from lightning_wm.attacks.base import RemovalAttack, Victim
from lightning_wm.registry import AttackSpec

AttackFactory = Callable[[nn.Module], RemovalAttack]
"""An attack with every option but the victim (``class_path``/``init_args`` in a config, a ``partial`` in Python)."""


class ChainAttack(RemovalAttack):
    """Apply attacks in order: the first gets the victim, each next one the previous attack as its victim.

    Only the last part trains. Each part is built in ``__init__`` from the previous one, and each part but the
    last is settled at once, untrained (its ``setup("test")``: pruning prunes, a transform is ready): an attack
    copies or wraps its victim when it is built, so an earlier part could not be trained afterwards, and a
    LightningModule cannot run a ``trainer.fit`` of its own. ``trainer.fit(chain, datamodule)`` trains the last
    part: every Lightning hook of the chain is the last part's, and ``chain(x)`` is its answer. So fine-pruning
    is ``[prune, fine_tune]`` (the fine-tuning trains the pruned copy); a part that needs training before another
    one is trained in a run of its own, and its result (an attack is a valid victim) is the chain's victim. A
    weight modification after a part that serves an API is refused: an API hands over no weights to modify (put
    the model modifications first).

    The cost (``epochs``, ``queries``, ``wall_time``) is the sum of the parts'; ``exposes_weights`` is the last
    part's, so a white-box key reads a chain ending in a model modification and raises
    :class:`~lightning_wm.verify.NotApplicable` on one ending behind an API. The checkpoint holds the last part.

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier``, a backbone or an attack.
        parts: the attacks in order, each without its victim (``class_path``/``init_args`` in a config).
    """

    def __init__(self, victim: Victim, parts: Sequence[AttackFactory]) -> None:
        if not parts:
            raise ValueError("a ChainAttack needs at least one part")
        super().__init__(torch.optim.Adam)
        built: list[RemovalAttack] = []
        previous: Victim = victim
        for index, factory in enumerate(parts):
            part = factory(previous)
            if not isinstance(part, RemovalAttack):
                raise TypeError(f"part {index} of the chain is a {type(part).__name__}, not a RemovalAttack")
            if built and part.exposes_weights and not built[-1].exposes_weights:
                raise ValueError(
                    f"part {index} ({type(part).__name__}) modifies weights after {type(built[-1]).__name__}, which "
                    "serves an API and hands over no weights: put the model modifications first"
                )
            if index < len(parts) - 1:
                part.setup("test")
            built.append(part)
            previous = part
        object.__setattr__(self, "parts", tuple(built))
        self.final = built[-1]

    parts: tuple[RemovalAttack, ...]

    @property
    def exposes_weights(self) -> bool:  # type: ignore[override]
        return self.final.exposes_weights

    @property
    def model(self) -> nn.Module:  # type: ignore[override]
        """The attacked model: the last part's."""
        return self.final.model

    @property
    def epochs(self) -> int:  # type: ignore[override]
        """Training epochs of all parts."""
        return sum(part.epochs for part in self.parts) if "final" in self._modules else 0

    @epochs.setter
    def epochs(self, value: int) -> None:
        """The parts count their own epochs; ``RemovalAttack.__init__``'s zero is ignored."""

    @property
    def wall_time(self) -> float:  # type: ignore[override]
        """Seconds of ``fit`` of all parts."""
        return sum(part.wall_time for part in self.parts) if "final" in self._modules else 0.0

    @wall_time.setter
    def wall_time(self, value: float) -> None:
        """The parts time their own fits; ``RemovalAttack.__init__``'s zero is ignored."""

    @property
    def queries(self) -> int:
        """Queries to black-box victims by all parts."""
        return sum(part.queries for part in self.parts)

    def _last(self) -> RemovalAttack:
        self.final._current_fx_name = self._current_fx_name
        return self.final

    def forward(self, x: Tensor) -> Tensor:
        return self.final(x)

    def prepare(self, scheme: Any) -> None:
        self.final.prepare(scheme)

    def setup(self, stage: str) -> None:
        for part in self.parts[:-1]:
            part._trainer = self._trainer
            part.setup("test")
            part._trainer = None
        self._last().setup(stage)

    def configure_optimizers(self) -> Any:
        return self._last().configure_optimizers()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.final.trainable_parameters()

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return self._last().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._last().validation_step(batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._last().test_step(batch, batch_idx)

    def on_fit_start(self) -> None:
        self._last().on_fit_start()

    def on_fit_end(self) -> None:
        self._last().on_fit_end()

    def on_train_epoch_end(self) -> None:
        self._last().on_train_epoch_end()

    def on_validation_epoch_end(self) -> None:
        self._last().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        self._last().on_test_epoch_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._last().on_save_checkpoint(checkpoint)
        checkpoint["attack_cost"] = {"epochs": self.epochs, "queries": self.queries, "wall_time": self.wall_time}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._last().on_load_checkpoint(checkpoint)


def _example(victim: nn.Module) -> ChainAttack:
    from lightning_wm.attacks.input_transform import SmoothingAttack
    from lightning_wm.attacks.prune import PruneAttack

    return ChainAttack(
        victim,
        [partial(PruneAttack, rate=0.3, scope="global"), partial(SmoothingAttack, kind="median", kernel_size=3)],
    )


ATTACK = AttackSpec(
    name="chain", attack=ChainAttack, threat_model="api-side", category="combined", example=_example, example_epochs=0
)
"""The registry entry (entry point ``chain`` of ``lightning_wm.attacks``): prune 30% then median smoothing."""
