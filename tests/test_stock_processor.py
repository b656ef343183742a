"""Checkpoints name the family's stock processor class, so engines and users without vopd can load them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vopd.models import load_model
from vopd.stock_processor import make_processor_stock


def test_saved_tiny_model_names_the_stock_processor_with_a_video_processor(tiny_qwen2_vl_dir):
    config = json.loads((tiny_qwen2_vl_dir / "processor_config.json").read_text())
    assert config["processor_class"] == "Qwen2VLProcessor"
    image, video = config["image_processor"], config["video_processor"]
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    for key in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std"):
        assert video[key] == image[key], key
    assert make_processor_stock(tiny_qwen2_vl_dir) is None  # already stock: nothing to change


def test_vopd_loader_falls_back_to_image_only_and_says_so(tiny_qwen2_vl_dir):
    # This environment has no torchvision, so the stock class cannot build its video processor.
    with pytest.warns(UserWarning, match="ImageOnlyQwen2VLProcessor"):
        _, processor = load_model(str(tiny_qwen2_vl_dir))
    assert type(processor).__name__ == "ImageOnlyQwen2VLProcessor"
    assert processor.image_processor is not None


def test_fresh_process_without_vopd_loads_model_and_image_processor(tiny_qwen2_vl_dir):
    """What a user without vopd gets here (no torchvision): the model, the image processor and the
    tokenizer load with the Auto classes; the stock AutoProcessor needs torchvision for its video
    processor and says so (in the vLLM environment it loads whole: tests/test_vllm_engine.py)."""
    code = (
        "import sys\n"
        "from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer\n"
        "m = AutoModelForImageTextToText.from_pretrained(sys.argv[1])\n"
        "ip = AutoImageProcessor.from_pretrained(sys.argv[1])\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "try:\n"
        "    AutoProcessor.from_pretrained(sys.argv[1]); print('processor: loaded')\n"
        "except ImportError as e:\n"
        "    print('processor: ImportError', 'Torchvision' in str(e))\n"
        "assert 'vopd' not in sys.modules\n"
        "print(type(m).__name__, type(ip).__name__, len(tok))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_qwen2_vl_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=str(tiny_qwen2_vl_dir),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Qwen2VLForConditionalGeneration Qwen2VLImageProcessor" in done.stdout
    assert "processor: ImportError True" in done.stdout


def test_vopd_train_checkpoint_names_only_classes_transformers_exports(vopd_train_checkpoint):
    """Every class named in the checkpoint's JSON configs (processor, image/video processor, tokenizer) is
    public: a tool reading tokenizer_config.json alone must not look for vopd's ImageOnly* classes."""
    from support.public_names import class_names, private_class_names

    names = class_names(vopd_train_checkpoint)
    assert "tokenizer_config.json.processor_class" in names and "processor_config.json.processor_class" in names
    assert not private_class_names(vopd_train_checkpoint), private_class_names(vopd_train_checkpoint)
