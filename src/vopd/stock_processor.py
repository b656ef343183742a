"""Save checkpoints under the family's stock processor class, so any engine can serve them.

Without torchvision (this project's CPU environment) the Qwen-family processors are built as the
image-only subclasses of `vopd.processors` (`ImageOnlyQwen2VLProcessor`, ...). A folder whose
`processor_config.json` (or `tokenizer_config.json`, which `save_pretrained` also stamps with
the processor's class) names such a class is useless outside vopd: `AutoProcessor` in a fresh
process does not know the class, and vLLM calls `Qwen2VLProcessor.from_pretrained` directly and
needs a video processor. `make_processor_stock(folder)` rewrites every saved JSON config of the
folder in place: the stock class name wherever a ``processor_class`` names an image-only class,
plus a video-processor entry derived from the image processor (same patch / merge / temporal
patch sizes, mean and std) for the families where the stock class requires one. The JSON is
written by hand because the video processor class itself cannot be built without torchvision;
the stock classes read it (tests/test_stock_processor.py checks this in the vLLM environment,
which has torchvision).

Loading such a folder back in vopd without torchvision goes through `vopd.models.load_model`,
which falls back to the image-only class and says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["STOCK_PROCESSORS", "make_processor_stock"]

PROCESSOR_CONFIG = "processor_config.json"

# image-only class -> (stock processor class, stock video processor class or None).
# The Qwen families get a video-processor entry too: their stock processors are what vLLM serves,
# and their video processor reads the same patch settings as the image processor. LLaVA-OneVision
# and SmolVLM get the stock name without one (their video processors need settings we cannot
# derive): the name is one transformers knows, and vopd's loader falls back to the image-only class.
STOCK_PROCESSORS: dict[str, tuple[str, str | None]] = {
    "ImageOnlyQwen2VLProcessor": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "ImageOnlyQwen2_5_VLProcessor": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "ImageOnlyQwen3VLProcessor": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "ImageOnlyLlavaOnevisionProcessor": ("LlavaOnevisionProcessor", None),
    "ImageOnlySmolVLMProcessor": ("SmolVLMProcessor", None),
}

# Image-processor keys the video processor shares (everything else keeps the stock default).
_SHARED_KEYS = (
    "patch_size",
    "temporal_patch_size",
    "merge_size",
    "image_mean",
    "image_std",
    "do_convert_rgb",
    "do_normalize",
    "do_rescale",
    "do_resize",
    "rescale_factor",
    "resample",
)


def make_processor_stock(folder: str | Path) -> str | None:
    """Rewrite the folder's saved JSON configs to name the stock processor class; return it.

    ``processor_config.json`` gets the stock class (and a video-processor entry, see
    `STOCK_PROCESSORS`); every other top-level ``*.json`` whose ``processor_class`` names an
    image-only class (``tokenizer_config.json``, ``preprocessor_config.json``, ...) gets the stock
    name. Returns None (and changes nothing) when no file names an image-only class.
    """
    root = Path(folder)
    found: str | None = None
    path = root / PROCESSOR_CONFIG
    if path.is_file():
        config: dict[str, Any] = json.loads(path.read_text())
        stock = STOCK_PROCESSORS.get(config.get("processor_class", ""))
        if stock is not None:
            found = _stock_processor_config(config, *stock)
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for other in sorted(root.glob("*.json")):
        if other.name == PROCESSOR_CONFIG:
            continue
        try:
            config = json.loads(other.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not a config this function wrote or understands: leave it alone
        stock = STOCK_PROCESSORS.get(config.get("processor_class", "")) if isinstance(config, dict) else None
        if stock is not None:
            config["processor_class"] = found = stock[0]
            # Keep the file's own layout (save_pretrained writes these with indent 2, unsorted).
            other.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return found


def _stock_processor_config(config: dict[str, Any], processor_class: str, video_class: str | None) -> str:
    """Stock names in a processor config (in place), plus a derived video processor where needed."""
    config["processor_class"] = processor_class
    image = config.get("image_processor")
    if video_class is not None and "video_processor" not in config and isinstance(image, dict):
        video = {k: image[k] for k in _SHARED_KEYS if k in image}
        video["video_processor_type"] = video_class
        video["processor_class"] = processor_class
        config["video_processor"] = video
    if isinstance(image, dict):
        image["processor_class"] = processor_class
    return processor_class
