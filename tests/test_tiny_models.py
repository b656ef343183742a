"""Tiny offline models: tokenizer, processor registration, save / reload with identical logits."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from support.public_names import class_names, private_class_names
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.processing_auto import processor_class_from_name

from vopd import models
from vopd.stock_processor import STOCK_PROCESSORS
from vopd.tiny_models import FAMILIES, build_tiny_model, build_tokenizer, save_tiny


def test_tokenizer_specials_first_and_colours_single_tokens():
    tok = build_tokenizer(family="qwen2_vl", vocab_size=400)
    assert tok.convert_ids_to_tokens(list(range(7))) == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0
    assert len(tok) <= 400
    for word in (" blue", " green", " cyan", " purple"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    text = "Ünïcode 🙂 is byte-level: 123"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tokenizer_custom_corpus_learns_its_words():
    tok = build_tokenizer(["zebra zebra zebra quokka quokka"] * 5, family="gemma3", vocab_size=300)
    assert len(tok.encode("zebra", add_special_tokens=False)) == 1
    assert tok.bos_token == "<bos>" and tok.eos_token == "<end_of_turn>"
    assert tok.boi_token == "<start_of_image>" and tok.image_token == "<image_soft_token>"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5", "gemma3", "idefics3"])
def test_chat_template_one_user_turn(family):
    tok = build_tokenizer(family=family)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    expected = {
        "qwen2_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n"
        "<|im_start|>assistant\n",
        "qwen3_5": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n",
        "gemma3": "<bos><start_of_turn>user\n<start_of_image>Hi?<end_of_turn>\n<start_of_turn>model\n",
        "idefics3": "<|im_start|>User:<image>Hi?<end_of_utterance>\nAssistant:",
    }[family]
    assert text == expected


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tiny model family 'llama9'.*qwen2_vl"):
        build_tiny_model("llama9")


def test_tiny_qwen2_vl_is_tiny_and_runs(tiny_qwen2_vl, tiny_images):
    model, processor = tiny_qwen2_vl
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) < 500_000
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    batch = models.build_prompts(processor, [tiny_images[0]], ["What color is the circle?"])
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 16  # 112 px -> 8x8 patches / 2x2
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def test_seed_controls_weights():
    a, _ = build_tiny_model("qwen2_vl", seed=1)
    b, _ = build_tiny_model("qwen2_vl", seed=1)
    c, _ = build_tiny_model("qwen2_vl", seed=2)
    wa, wb, wc = (m.lm_head.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_size_overrides():
    model, _ = build_tiny_model("qwen2_vl", text={"hidden_size": 128, "num_hidden_layers": 3}, vision={"depth": 1})
    assert model.config.text_config.hidden_size == 128
    assert model.config.text_config.num_hidden_layers == 3
    assert model.config.vision_config.depth == 1
    assert model.config.vision_config.hidden_size == 128  # merger output follows the text width


def test_image_only_processor_registered_by_name_only():
    assert processor_class_from_name("ImageOnlyQwen2VLProcessor").__module__ == "vopd.processors"
    # Real checkpoints name the stock class and must keep getting it.
    assert processor_class_from_name("Qwen2VLProcessor").__module__.startswith("transformers.")


def test_saved_dir_reloads_full_processor_and_same_logits(tiny_qwen2_vl, tiny_qwen2_vl_dir, tiny_images):
    model, processor = tiny_qwen2_vl
    assert (tiny_qwen2_vl_dir / "model.safetensors").exists()
    cfg = json.loads((tiny_qwen2_vl_dir / "processor_config.json").read_text())
    assert cfg["processor_class"] == "Qwen2VLProcessor"  # the stock class: servable (tests/test_stock_processor.py)
    with pytest.warns(UserWarning, match="ImageOnlyQwen2VLProcessor"):  # no torchvision here: announced fallback
        reloaded = models.load_model(str(tiny_qwen2_vl_dir))[1]
    assert type(reloaded).__name__ == "ImageOnlyQwen2VLProcessor"  # not only the tokenizer
    assert type(reloaded.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    model2 = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl_dir).eval()
    batch = models.build_prompts(processor, list(tiny_images), ["Hi", "What color is the circle?"])
    batch2 = models.build_prompts(reloaded, list(tiny_images), ["Hi", "What color is the circle?"])
    for key in batch:
        assert torch.equal(batch[key], batch2[key]), key
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model2(**batch2).logits)


_FRESH_PROCESS = """
import sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
import vopd.models as M
d = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(d).eval()
proc = M.load_model(d)[1]  # the stock Qwen2VLProcessor needs torchvision: vopd's image-only fallback
img = Image.new("RGB", (112, 84), (30, 120, 200))
batch = M.build_prompts(proc, [img], ["What color is the square?"])
with torch.no_grad():
    torch.save(model(**batch).logits, sys.argv[2])
print(type(proc).__name__)
"""


@pytest.mark.slow
def test_reload_in_fresh_offline_process(tiny_qwen2_vl, tiny_qwen2_vl_dir, tmp_path):
    out = tmp_path / "logits.pt"
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(tiny_qwen2_vl_dir), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,  # 120 s ran out (subprocess.TimeoutExpired) beside three other jobs on 2 cores
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ImageOnlyQwen2VLProcessor")
    model, processor = tiny_qwen2_vl
    from PIL import Image

    batch = models.build_prompts(
        processor, [Image.new("RGB", (112, 84), (30, 120, 200))], ["What color is the square?"]
    )
    with torch.no_grad():
        expected = model(**batch).logits
    assert torch.equal(torch.load(out, weights_only=True), expected)


def test_families_list_is_complete():
    assert set(FAMILIES) == {
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "qwen3_5",
        "idefics3",
        "smolvlm",
        "llava_onevision",
        "gemma3",
    }


def test_save_tiny_returns_directory(tmp_path, tiny_qwen2_vl):
    path = save_tiny(*tiny_qwen2_vl, tmp_path / "m")
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)  # safetensors only


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_saves_and_reloads_with_full_processor(tiny_models, tiny_images, family, tmp_path):
    model, processor = tiny_models(family)
    path = save_tiny(model, processor, tmp_path / family)
    # Every class a saved config names is one transformers exports (no vopd-private ImageOnly*).
    assert class_names(path) and not private_class_names(path), private_class_names(path)
    stock = STOCK_PROCESSORS.get(type(processor).__name__)
    if stock is not None:  # saved under the stock class (needs torchvision to load as such; not here)
        assert json.loads((path / "processor_config.json").read_text())["processor_class"] == stock[0]
    else:
        assert type(AutoProcessor.from_pretrained(path)) is type(processor)  # the full processor, not a tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the announced image-only fallback for the stock classes
        model2, processor2 = models.load_model(str(path))
    assert type(processor2) is type(processor)
    assert type(processor2.image_processor).__name__.endswith("ImageProcessorPil")
    assert type(model2) is type(model)
    texts = ["What color is the circle?", "Hi"]
    batch = models.build_prompts(processor, list(tiny_images), texts)
    batch2 = models.build_prompts(processor2, list(tiny_images), texts)
    for key in batch:
        assert torch.equal(torch.as_tensor(batch[key]), torch.as_tensor(batch2[key])), key
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model2(**batch2).logits)


def test_checkpoint_naming_stock_processor_falls_back_to_image_only(tiny_qwen2_vl, tmp_path):
    """A real Qwen2-VL checkpoint names Qwen2VLProcessor, whose video processor needs torchvision."""
    path = save_tiny(*tiny_qwen2_vl, tmp_path / "stock")
    for name in ("processor_config.json", "tokenizer_config.json"):
        cfg = json.loads((path / name).read_text())
        cfg["processor_class"] = "Qwen2VLProcessor"
        (path / name).write_text(json.dumps(cfg))
    # save_tiny writes the stock class with a video-processor entry (vopd.stock_processor); loading
    # that entry needs torchvision, which this environment never has.
    with pytest.raises(ImportError, match="Torchvision"):
        AutoProcessor.from_pretrained(path)
    with pytest.warns(UserWarning, match="using vopd's ImageOnlyQwen2VLProcessor"):
        _, processor = models.load_model(str(path))
    assert type(processor).__name__ == "ImageOnlyQwen2VLProcessor"
