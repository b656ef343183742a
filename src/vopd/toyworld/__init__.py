"""The toy world: procedural fine-grained scenes, a tiny Qwen2-VL base and its gap.

Importing the package registers its names with :mod:`vopd.specs` (loaders imported lazily, so
this stays cheap): the model spec ``toy-base`` (the shipped base checkpoint) and the data spec
``toyworld:N[:SEED]`` (N generated scenes).
"""

from __future__ import annotations

from typing import Any

from vopd.specs import register_data_spec, register_model_spec


def _load_toy_base(**options: Any) -> tuple[Any, Any]:
    from vopd.models import load_model
    from vopd.toyworld.model import toy_base_path

    options.pop("seed", None)
    return load_model(str(toy_base_path()), **options)


def _toy_scenes(spec: str) -> list:
    from vopd.toyworld.scenes import make_dataset

    parts = spec.split(":")
    try:
        n = int(parts[1])
        seed = int(parts[2]) if len(parts) > 2 else 0
    except (IndexError, ValueError):
        raise ValueError(f"data.train={spec!r}: write toyworld:N or toyworld:N:SEED (integers)") from None
    return make_dataset(n, seed)


register_model_spec("toy-base", _load_toy_base)
register_data_spec("toyworld", _toy_scenes)
