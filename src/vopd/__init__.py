"""Vision-OPD: on-policy self-distillation from a multimodal model's own zoomed-in view."""

__version__ = "0.1.0"
