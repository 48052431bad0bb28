"""Watermark schemes: each a Callback (plus the model mixin where it changes the loss) with its key."""

from lightning_wm.watermarks.base import WatermarkScheme, resolve_layer
from lightning_wm.watermarks.uchida import UchidaKey, UchidaWatermark

__all__ = ["UchidaKey", "UchidaWatermark", "WatermarkScheme", "resolve_layer"]
