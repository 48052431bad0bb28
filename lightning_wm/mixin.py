"""``WatermarkMixin``: the place where watermark schemes change a LightningModule's objective."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from lightning_wm.watermarks.base import WatermarkScheme


def _adds_watermark_loss(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def training_step(self: WatermarkMixin, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_in_watermarked_step", False):
            return step(self, batch, batch_idx, *args, **kwargs)
        self._in_watermarked_step = True
        try:
            output = step(self, batch, batch_idx, *args, **kwargs)
        finally:
            self._in_watermarked_step = False
        return self.add_watermark_loss(batch, output)

    training_step._adds_watermark_loss = True  # type: ignore[attr-defined]
    return training_step


class WatermarkMixin:
    """Add the loss terms of the attached watermark schemes to ``training_step``'s loss.

    Mix it into any LightningModule, in any base order: every ``training_step`` a subclass defines or inherits
    (``class Marked(WatermarkMixin, Existing): pass``) is wrapped, so
    the scheme terms are computed inside the step, hence inside DDP's forward and inside autocast, once per
    micro-batch (Lightning divides by ``accumulate_grad_batches``, so a term counts once per optimizer step), and
    never in a callback's own ``backward()`` (which breaks DDP). Schemes are the
    :class:`~lightning_wm.watermarks.base.WatermarkScheme` callbacks in ``trainer.callbacks``.

    ``training_step`` may return the loss or a mapping with ``"loss"`` (and, to spare the schemes a second forward,
    ``"logits"``).

    Example::

        class MyModule(WatermarkMixin, L.LightningModule):
            def training_step(self, batch, batch_idx):
                x, y = batch
                return F.cross_entropy(self.net(x), y)

        trainer = L.Trainer(callbacks=[UchidaWatermark(layer="net.conv2", key_path="owner.key")])
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = getattr(cls, "training_step", None)
        if callable(step) and not getattr(step, "_adds_watermark_loss", False):
            cls.training_step = _adds_watermark_loss(step)  # type: ignore[method-assign]

    @property
    def watermark_schemes(self) -> list[WatermarkScheme]:
        """The watermark schemes attached to the current trainer."""
        from lightning_wm.watermarks.base import WatermarkScheme

        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return []
        return [cb for cb in trainer.callbacks if isinstance(cb, WatermarkScheme)]

    def add_watermark_loss(self, batch: Any, output: Any) -> Any:
        """Return ``output`` with every scheme's term added to its loss, and log each term as ``wm/<scheme>/loss``
        (at the steps Lightning writes, every ``log_every_n_steps``)."""
        if output is None:
            return output
        loss: Tensor = output["loss"] if isinstance(output, Mapping) else output
        from lightning_wm.watermarks.base import logs_this_step

        log = logs_this_step(self)  # type: ignore[arg-type]
        seen: dict[str, int] = {}
        for scheme in self.watermark_schemes:
            # named after the scheme (a second scheme of the same name gets a suffix), never after its key_path
            name = scheme.name or type(scheme).__name__
            seen[name] = seen.get(name, 0) + 1
            label = name if seen[name] == 1 else f"{name}_{seen[name]}"
            term = scheme.training_loss(self, batch, output)  # type: ignore[arg-type]
            scheme.loss_reached = True
            if term is None:
                continue
            if log:
                self.log(f"wm/{label}/loss", term.detach(), on_step=True, on_epoch=False)  # type: ignore[attr-defined]
            loss = loss + term
        if isinstance(output, Mapping):
            return {**output, "loss": loss}
        return loss
