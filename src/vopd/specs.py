"""Named specs: what ``model.path``, ``teacher.path``, ``--model`` and ``data.train`` may say besides a path.

One resolver for every command (train, gap, eval, demo):

- a model spec is a local folder, a hub id, ``tiny:<family>`` (a random tiny model, see
  :mod:`vopd.tiny_models`) or a name that a higher layer registered with
  :func:`register_model_spec` (the toy world registers ``toy-base``);
- a data spec is a JSONL file / folder, or ``<scheme>:<args>`` for a scheme registered with
  :func:`register_data_spec` (the toy world registers ``toyworld:N[:SEED[:WORLD]]``).

Registries, not imports: this core module never imports the applications that add names. The
``vopd`` command line imports them (``vopd.toyworld`` registers on import), so from Python call
``import vopd.toyworld`` before using its names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "register_model_spec",
    "register_data_spec",
    "resolve_model_spec",
    "resolve_processor",
    "data_spec_loader",
    "model_spec_names",
]

# name -> f(**load_options) -> (model, processor); load_options as in resolve_model_spec.
_MODELS: dict[str, Callable[..., tuple[Any, Any]]] = {}
# scheme -> f(spec) -> list of vopd.records.Sample
_DATA: dict[str, Callable[[str], list]] = {}


def register_model_spec(name: str, load: Callable[..., tuple[Any, Any]]) -> None:
    """Make ``name`` a model spec; ``load(dtype=, trust_remote_code=, attn_implementation=, seed=)``
    returns ``(model, processor)``. Re-registering a name replaces it."""
    if ":" in name or "/" in name:
        raise ValueError(f"model spec name {name!r} must not contain ':' or '/' (those mean tiny:<family> / a path)")
    _MODELS[name] = load


def register_data_spec(scheme: str, load: Callable[[str], list]) -> None:
    """Make ``<scheme>:...`` a data spec; ``load(spec)`` gets the whole spec and returns samples."""
    _DATA[scheme] = load


def model_spec_names() -> list[str]:
    """The registered model spec names plus ``tiny:<family>``."""
    return sorted(_MODELS) + ["tiny:<family>"]


def resolve_model_spec(
    spec: str,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    seed: int = 0,
) -> tuple[Any, Any]:
    """``(model, processor)`` for a model spec (see the module docstring).

    ``tiny:<family>`` is built at random from ``seed`` in float32 (``dtype`` does not apply); a
    folder or hub id goes to :func:`vopd.models.load_model`.
    """
    if not spec:
        raise ValueError(
            f"empty model spec: give a hub id, a local checkpoint folder, or one of {', '.join(model_spec_names())}"
        )
    if spec.startswith("tiny:"):
        from vopd.tiny_models import build_tiny_model

        return build_tiny_model(spec.split(":", 1)[1], seed=seed)
    if spec in _MODELS:
        return _MODELS[spec](
            dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation, seed=seed
        )
    if spec == "toy-base":  # a well-known name whose provider is not imported
        raise ValueError(
            "model spec 'toy-base' is registered by the toy world: import vopd.toyworld first "
            "(the vopd command line does)"
        )
    from vopd.models import load_model

    return load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)


def resolve_processor(spec: str, *, trust_remote_code: bool = False) -> Any:
    """The processor of a model spec: a folder or hub id without loading its weights (through
    :func:`vopd.models.load_processor`, the loader training uses); ``tiny:*`` and registered
    names through :func:`resolve_model_spec`."""
    if spec.startswith("tiny:") or spec in _MODELS or spec == "toy-base":
        return resolve_model_spec(spec, trust_remote_code=trust_remote_code)[1]
    from vopd.models import load_processor

    return load_processor(spec, trust_remote_code=trust_remote_code)


def data_spec_loader(spec: str) -> Callable[[str], list] | None:
    """The loader of a registered ``<scheme>:...`` data spec, or None when ``spec`` is a path."""
    scheme = spec.split(":", 1)[0] if ":" in spec else None
    if scheme in _DATA:
        return _DATA[scheme]
    if scheme == "toyworld":
        raise ValueError(
            f"data spec {spec!r} is registered by the toy world: import vopd.toyworld first "
            "(the vopd command line does)"
        )
    return None
