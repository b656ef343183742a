"""Which class names a saved model folder's JSON configs mention that transformers does not export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import transformers

# Keys whose value is a class name (not a model_type or rope_type tag).
_CLASS_KEYS = ("processor_class", "tokenizer_class", "image_processor_type", "video_processor_type")


def class_names(folder: str | Path) -> dict[str, str]:
    """``{"file: dotted.key": class name}`` for every class-naming key in the folder's ``*.json`` files."""
    found: dict[str, str] = {}

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _CLASS_KEYS or key == "feature_extractor_type":
                    if isinstance(value, str):
                        found[f"{where}.{key}"] = value
                walk(value, f"{where}.{key}")

    for path in sorted(Path(folder).glob("*.json")):
        walk(json.loads(path.read_text()), path.name)
    return found


def private_class_names(folder: str | Path) -> dict[str, str]:
    """The entries of `class_names` that are not public transformers classes (e.g. vopd's ImageOnly*)."""
    return {k: v for k, v in class_names(folder).items() if not hasattr(transformers, v)}
