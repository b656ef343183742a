"""The toy world: procedural fine-grained scenes, a tiny Qwen2-VL base and its gap.

Importing the package registers its names with :mod:`vopd.specs` (loaders imported lazily, so
this stays cheap): the model spec ``toy-base`` (the shipped base checkpoint) and the data spec
``toyworld:N[:SEED[:WORLD]]`` (N generated scenes of a named world, "M" by default).
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
    from vopd.toyworld.scenes import WORLDS, make_dataset

    parts = spec.split(":")
    try:
        if len(parts) > 4:
            raise ValueError
        n = int(parts[1])
        seed = int(parts[2]) if len(parts) > 2 else 0
    except (IndexError, ValueError):
        raise ValueError(
            f"data.train={spec!r}: write toyworld:N, toyworld:N:SEED or toyworld:N:SEED:WORLD "
            f"(N, SEED integers; WORLD one of {sorted(WORLDS)})"
        ) from None
    world = parts[3] if len(parts) > 3 else "M"
    if world not in WORLDS:
        raise ValueError(f"data.train={spec!r}: unknown toy world {world!r}; choose from {sorted(WORLDS)}")
    return make_dataset(n, seed, WORLDS[world])


register_model_spec("toy-base", _load_toy_base)
register_data_spec("toyworld", _toy_scenes)
