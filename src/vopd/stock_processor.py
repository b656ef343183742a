"""Save checkpoints under the family's stock processor class, so any engine can serve them.

Without torchvision (this project's CPU environment) the Qwen-family processors are built as the
image-only subclasses of `vopd.processors` (`ImageOnlyQwen2VLProcessor`, ...). A folder whose
`processor_config.json` names such a class is useless outside vopd: `AutoProcessor` in a fresh
process does not know the class, and vLLM calls `Qwen2VLProcessor.from_pretrained` directly and
needs a video processor. `make_processor_stock(folder)` rewrites the saved processor config in
place: the stock class name, plus a video-processor entry derived from the image processor
(same patch / merge / temporal patch sizes, mean and std) for the families where the stock class
requires one. The JSON is written by hand because the video processor class itself cannot be
built without torchvision; the stock classes read it (tests/test_stock_processor.py checks this
in the vLLM environment, which has torchvision).

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
# Only the Qwen families are converted: their stock processors are what vLLM serves, and their
# video processor reads the same patch settings as the image processor. LLaVA-OneVision and
# SmolVLM stay image-only (their video processors need settings we cannot derive).
STOCK_PROCESSORS: dict[str, tuple[str, str | None]] = {
    "ImageOnlyQwen2VLProcessor": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "ImageOnlyQwen2_5_VLProcessor": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "ImageOnlyQwen3VLProcessor": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
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
    """Rewrite ``folder/processor_config.json`` to name the stock processor class; return it.

    Returns None (and changes nothing) when the folder has no processor config or its class is
    already a stock one or has no stock equivalent listed in `STOCK_PROCESSORS`.
    """
    path = Path(folder) / PROCESSOR_CONFIG
    if not path.is_file():
        return None
    config: dict[str, Any] = json.loads(path.read_text())
    stock = STOCK_PROCESSORS.get(config.get("processor_class", ""))
    if stock is None:
        return None
    processor_class, video_class = stock
    config["processor_class"] = processor_class
    image = config.get("image_processor")
    if video_class is not None and "video_processor" not in config and isinstance(image, dict):
        video = {k: image[k] for k in _SHARED_KEYS if k in image}
        video["video_processor_type"] = video_class
        video["processor_class"] = processor_class
        config["video_processor"] = video
    if isinstance(image, dict):
        image["processor_class"] = processor_class
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return processor_class
