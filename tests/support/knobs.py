"""Loss settings for tests, built the one way the trainer builds them (``loss.*`` -> `LossKnobs`)."""

from __future__ import annotations

from typing import Any

from vopd.config import LossConfig
from vopd.objectives import LossKnobs


def knobs(**loss: Any) -> LossKnobs:
    """`LossKnobs` of the ``loss.*`` keys given (the others at their config defaults)."""
    return LossKnobs.from_config(LossConfig(**loss))
