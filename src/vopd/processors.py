"""Image-only processors: the stock processors of several families minus their video processor.

Several stock processors (Qwen2-VL, Qwen2.5-VL, Qwen3-VL / Qwen3.5, SmolVLM, LLaVA-OneVision)
insist on a video processor, which needs torchvision (never installed here). The `ImageOnly*`
subclasses below drop it. They are registered with `AutoProcessor` when this module is imported
(`vopd.models` imports it), under their own names only, so folders that name them (older tiny
models, the shipped toy base) load while real checkpoints keep loading the stock classes;
`vopd.models.load_model` falls back to them (with a warning) for a checkpoint whose stock
processor cannot load. Checkpoints and `save_tiny` name the stock class (`vopd.stock_processor`).
"""

from __future__ import annotations

from transformers import (
    AutoProcessor,
    LlavaOnevisionProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
    SmolVLMProcessor,
)
from transformers.processing_utils import ProcessorMixin

__all__ = [
    "IMAGE_ONLY_PROCESSORS",
    "ImageOnlyLlavaOnevisionProcessor",
    "ImageOnlyQwen2VLProcessor",
    "ImageOnlyQwen2_5_VLProcessor",
    "ImageOnlyQwen3VLProcessor",
    "ImageOnlySmolVLMProcessor",
    "register_image_only_processors",
]


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without a video processor (which needs torchvision); images only."""

    # ProcessorMixin finds sub-processors and the settings to save in this signature (and in
    # __code__.co_varnames), so the parameters are spelled out rather than taken as *args.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without a video processor (which needs torchvision); images only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor (Qwen3-VL, Qwen3.5) without a video processor; images only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without a video processor (which needs torchvision); images only."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """SmolVLMProcessor without a video processor (torchvision) or num2words; images only."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs):
        # SmolVLMProcessor.__init__ insists on num2words, used only to caption video frames.
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # The parent reads video defaults (num_frames, fps) off the video processor.
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


# family -> image-only processor class (Qwen3.5 checkpoints use Qwen3VLProcessor).
IMAGE_ONLY_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": ImageOnlyQwen2VLProcessor,
    "qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor,
    "qwen3_vl": ImageOnlyQwen3VLProcessor,
    "qwen3_5": ImageOnlyQwen3VLProcessor,
    "llava_onevision": ImageOnlyLlavaOnevisionProcessor,
    "smolvlm": ImageOnlySmolVLMProcessor,
}
_registered = False


def register_image_only_processors() -> dict[str, type[ProcessorMixin]]:
    """Register the `ImageOnly*Processor` classes with `AutoProcessor` (idempotent); return the family map.

    Each is registered under a private key of its own, not under the family's config class, so
    `AutoProcessor.from_pretrained` resolves them only for checkpoints whose processor config
    names them (saved tiny models); real checkpoints keep their stock processor classes.
    """
    global _registered
    if not _registered:
        for cls in set(IMAGE_ONLY_PROCESSORS.values()):
            key = type(f"_{cls.__name__}Key", (), {"__module__": __name__})
            AutoProcessor.register(key, cls, exist_ok=True)
        _registered = True
    return IMAGE_ONLY_PROCESSORS


register_image_only_processors()
