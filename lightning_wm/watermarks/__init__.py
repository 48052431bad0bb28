"""Watermark schemes: each a Callback (plus the model mixin where it changes the loss) with its key."""

from lightning_wm.watermarks.abstract import AbstractTrigger
from lightning_wm.watermarks.base import MissingLayerError, WatermarkScheme, resolve_layer
from lightning_wm.watermarks.blackmarks import BlackMarksKey, BlackMarksTrigger, BlackMarksWatermark
from lightning_wm.watermarks.csp import CSPKey, CSPWatermark
from lightning_wm.watermarks.dawn import DAWNHead, DAWNKey, DAWNWatermark
from lightning_wm.watermarks.deepmarks import DeepMarksKey, DeepMarksWatermark
from lightning_wm.watermarks.deepsigns import DeepSignsKey, DeepSignsWatermark
from lightning_wm.watermarks.ewe import EWEKey, EWEWatermark
from lightning_wm.watermarks.frontier_stitching import (
    FrontierStitchingKey,
    FrontierStitchingWatermark,
    FrontierTrigger,
)
from lightning_wm.watermarks.key_samples import ContentTrigger, KeySampleGenerator, NoiseTrigger, UnrelatedTrigger
from lightning_wm.watermarks.new_label import NewLabelTrigger
from lightning_wm.watermarks.trigger_set import TriggerSetKey, TriggerSetWatermark
from lightning_wm.watermarks.uchida import UchidaKey, UchidaWatermark
from lightning_wm.watermarks.usp import USPKey, USPWatermark

__all__ = [
    "AbstractTrigger",
    "BlackMarksKey",
    "BlackMarksTrigger",
    "BlackMarksWatermark",
    "CSPKey",
    "CSPWatermark",
    "ContentTrigger",
    "DAWNHead",
    "DAWNKey",
    "DAWNWatermark",
    "DeepMarksKey",
    "DeepMarksWatermark",
    "DeepSignsKey",
    "DeepSignsWatermark",
    "EWEKey",
    "EWEWatermark",
    "FrontierStitchingKey",
    "FrontierStitchingWatermark",
    "FrontierTrigger",
    "KeySampleGenerator",
    "NewLabelTrigger",
    "NoiseTrigger",
    "TriggerSetKey",
    "TriggerSetWatermark",
    "UchidaKey",
    "UchidaWatermark",
    "USPKey",
    "USPWatermark",
    "UnrelatedTrigger",
    "WatermarkScheme",
    "resolve_layer",
    "MissingLayerError",
]
