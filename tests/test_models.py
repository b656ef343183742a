"""The model adapter on every tiny family: prompts, repeat, append, response-only scoring."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM

from vopd.models import (
    append_responses,
    build_prompts,
    chat_prompt,
    load_model,
    output_head,
    repeat_prompts,
    response_hidden_states,
    response_logits,
    vision_token_ids,
)
from vopd.tiny_models import FAMILIES as ALL_FAMILIES

# Float comparisons between code paths: CI runs this file under a second kernel set too (.ci/run).
pytestmark = pytest.mark.numerics

FAMILIES = list(ALL_FAMILIES)

TEXTS = ["What color is the circle?", "Hi"]


def _responses(processor, batch_size: int, length: int, seed: int = 0):
    """Random ordinary-text response ids and a mask with one early-ending row."""
    g = torch.Generator().manual_seed(seed)
    special = set(vision_token_ids(processor)) | set(processor.tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in special])
    ids = allowed[torch.randint(len(allowed), (batch_size, length), generator=g)]
    mask = torch.ones(batch_size, length, dtype=torch.bool)
    mask[0, length - 2 :] = False
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_response_logits_equal_full_forward(tiny_models, tiny_images, family):
    model, processor = tiny_models(family)
    batch = repeat_prompts(build_prompts(processor, list(tiny_images), TEXTS), 2)
    ids, mask = _responses(processor, 4, 5)
    inputs = append_responses(batch, ids, mask)
    prompt_len = batch["input_ids"].shape[1]
    with torch.no_grad():
        full = model(**inputs).logits
        got = response_logits(model, inputs, 5)
        hidden = response_hidden_states(model, inputs, 5)
    assert got.shape == (4, 5, len(processor.tokenizer))
    assert hidden.shape == (4, 5, model.config.get_text_config().hidden_size)
    # fp32 logits/log-probs of size <= ~6 (log V) through ~70 sqrt-units of reductions (2 layers: sequence,
    # hidden, MLP; tests/support/tolerance.py): another order moves them by ~70 * 2**-24 * 6 ~ 3e-6. The
    # response-only head vs the full logits: another matmul shape, hence atol 1e-5.
    torch.testing.assert_close(got, full[:, prompt_len - 1 : prompt_len + 4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_does_not_change_a_row(tiny_models, tiny_images, family):
    model, processor = tiny_models(family)
    # Row 1 (short text, smaller image) is left-padded next to the longer row 0.
    batch = build_prompts(processor, list(tiny_images), ["What color is the circle? " * 3, "Hi"])
    assert int(batch["attention_mask"][1].sum()) < batch["input_ids"].shape[1]
    ids, mask = _responses(processor, 2, 4, seed=1)
    alone = build_prompts(processor, [tiny_images[1]], ["Hi"])
    with torch.no_grad():
        batched = response_logits(model, append_responses(batch, ids, mask), 4)
        single = response_logits(model, append_responses(alone, ids[1:], mask[1:]), 4)
    # Left padding changes the attention sums' length and the batch's matmul blocking: the fp32
    # bound above (~3e-6 for these sizes), atol/rtol 1e-5.
    torch.testing.assert_close(batched[1], single[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_student_and_teacher_batches_align(tiny_models, tiny_images, family):
    """Same response ids under a full image and a (2x) crop: [B, T, V] outputs, row by row."""
    model, processor = tiny_models(family)
    full = tiny_images[0]
    crop = full.crop((10, 20, 66, 76)).resize((112, 112), Image.BICUBIC)
    small_crop = full.crop((10, 20, 38, 48)).resize((56, 56), Image.BICUBIC)
    text = "What color is the circle?"
    student = repeat_prompts(build_prompts(processor, [full, full], [text, text]), 2)
    teacher = repeat_prompts(build_prompts(processor, [crop, small_crop], [text, text]), 2)
    ids, mask = _responses(processor, 4, 6, seed=2)
    with torch.no_grad():
        s = response_logits(model, append_responses(student, ids, mask), 6)
        t = response_logits(model, append_responses(teacher, ids, mask), 6)
        # Row 2 of the teacher batch (prompt 1 = the small crop) scored on its own.
        t_row = response_logits(
            model, append_responses(build_prompts(processor, [small_crop], [text]), ids[2:3], mask[2:3]), 6
        )
    assert s.shape == t.shape == (4, 6, len(processor.tokenizer))
    torch.testing.assert_close(t[2], t_row[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(s, t)  # the image matters


@pytest.mark.parametrize("family", FAMILIES)
def test_repeat_prompts_equals_processor_built_repeats(tiny_models, tiny_images, family):
    _, processor = tiny_models(family)
    images, texts = list(tiny_images), TEXTS
    got = repeat_prompts(build_prompts(processor, images, texts), 3)
    expected = build_prompts(processor, [im for im in images for _ in range(3)], [t for t in texts for _ in range(3)])
    assert set(got.keys()) == set(expected.keys())
    for key in expected:
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(expected[key])), key


@pytest.mark.parametrize("family", FAMILIES)
def test_build_prompts_left_pads_and_has_side_inputs(tiny_models, tiny_images, family):
    _, processor = tiny_models(family)
    batch = build_prompts(processor, list(tiny_images), ["What color is the circle? " * 3, "Hi"])
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[1, 0]
    pad = processor.tokenizer.pad_token_id
    assert (batch["input_ids"][mask == 0] == pad).all()
    required = {
        "qwen2_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
        "qwen2_5_vl": {"pixel_values", "image_grid_thw"},
        "qwen3_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
        "qwen3_5": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
        "gemma3": {"pixel_values", "token_type_ids"},
        "idefics3": {"pixel_values", "pixel_attention_mask"},
        "smolvlm": {"pixel_values", "pixel_attention_mask"},
        "llava_onevision": {"pixel_values", "image_sizes"},
    }[family]
    assert required <= set(batch.keys())


def test_build_prompts_rejects_too_long_rows(tiny_qwen2_vl, tiny_images):
    _, processor = tiny_qwen2_vl
    lengths = build_prompts(processor, list(tiny_images), TEXTS)["attention_mask"].sum(1)
    limit = int(lengths.min())  # row 0 is longer
    with pytest.raises(ValueError, match=rf"prompt row 0 has {int(lengths[0])} tokens, over max_prompt_tokens={limit}"):
        build_prompts(processor, list(tiny_images), TEXTS, max_prompt_tokens=limit)
    build_prompts(processor, list(tiny_images), TEXTS, max_prompt_tokens=int(lengths.max()))
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        build_prompts(processor, list(tiny_images), TEXTS[:1])


def test_append_responses_layout(tiny_qwen2_vl, tiny_images):
    _, processor = tiny_qwen2_vl
    batch = build_prompts(processor, list(tiny_images), TEXTS)
    ids = torch.tensor([[40, 41, 2], [42, 2, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = append_responses(batch, ids, mask)
    P = batch["input_ids"].shape[1]
    assert torch.equal(out["input_ids"][:, P:], ids)
    assert torch.equal(out["input_ids"][:, :P], batch["input_ids"])
    assert out["attention_mask"][:, P:].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["mm_token_type_ids"].shape == out["input_ids"].shape
    assert (out["mm_token_type_ids"][:, P:] == 0).all()
    assert out["pixel_values"] is batch["pixel_values"]
    with pytest.raises(ValueError, match="repeat_prompts"):
        append_responses(batch, ids.repeat(2, 1), mask.repeat(2, 1))


def test_chat_prompt_thinking_modes():
    from vopd.tiny_models import build_tokenizer

    class _P:  # a tokenizer stands in for a processor here
        def __init__(self, tok):
            self.tokenizer, self.chat_template = tok, tok.chat_template

        def apply_chat_template(self, *args, **kwargs):
            return self.tokenizer.apply_chat_template(*args, **kwargs)

    qwen35 = _P(build_tokenizer(family="qwen3_5"))
    assert chat_prompt(qwen35, "Q").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # non-thinking default
    assert chat_prompt(qwen35, "Q", thinking=True).endswith("<|im_start|>assistant\n<think>\n")
    qwen2 = _P(build_tokenizer(family="qwen2_vl"))
    assert chat_prompt(qwen2, "Q") == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\n"
    )


def test_vision_token_ids_qwen(tiny_qwen2_vl):
    model, processor = tiny_qwen2_vl
    tok = processor.tokenizer
    expected = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    assert vision_token_ids(processor, model) == sorted(expected)
    assert tok.eos_token_id not in vision_token_ids(processor, model)


def test_output_head_applies_softcapping(tiny_qwen2_vl, tiny_images):
    model, processor = tiny_qwen2_vl
    capped = copy.deepcopy(model)
    capped.config.get_text_config().final_logit_softcapping = 0.05
    head = output_head(capped)
    h = torch.randn(3, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0))
    raw = model.lm_head(h)
    torch.testing.assert_close(head(h), torch.tanh(raw / 0.05) * 0.05)
    assert head(h).abs().max() <= 0.05


def test_load_model_round_trip(tiny_qwen2_vl, tiny_qwen2_vl_dir, tiny_images):
    model, processor = load_model(str(tiny_qwen2_vl_dir))
    assert not model.training and model.dtype == torch.float32
    assert type(processor).__name__ == "ImageOnlyQwen2VLProcessor"
    batch = build_prompts(processor, list(tiny_images), TEXTS)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, tiny_qwen2_vl[0](**batch).logits)
    bf16, _ = load_model(str(tiny_qwen2_vl_dir), dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_model(str(tmp_path), dtype="float8")
    cfg = AutoConfig.for_model(
        "qwen2",
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "textonly")
    with pytest.raises(ValueError, match="not an image-text-to-text"):
        load_model(str(tmp_path / "textonly"))


def test_bf16_ema_teacher_tracks_the_fp32_average():
    """A bf16 teacher copy must not round EMA updates of size rate * lr away (it would stay frozen)."""
    from vopd.teacher import make_teacher

    gen = torch.Generator().manual_seed(0)
    student = torch.nn.Linear(64, 64)
    with torch.no_grad():
        student.weight.copy_(torch.randn(64, 64, generator=gen) * 0.02)
    direction = torch.randn(64, 64, generator=gen).sign()
    teacher = make_teacher("ema", student, ema_rate=0.05, dtype=torch.bfloat16)
    reference = {k: v.detach().double().clone() for k, v in student.named_parameters()}
    start = reference["weight"].clone()
    for _ in range(65):  # the paper's run: 65 steps of ~lr (2e-6) each
        with torch.no_grad():
            student.weight.add_(2e-6 * direction)
        teacher.update(student)
        for name, p in student.named_parameters():
            reference[name] += 0.05 * (p.detach().double() - reference[name])
    assert teacher.model.weight.dtype == torch.bfloat16
    state = teacher.state_dict()
    # fp32 accumulation vs a float64 reference: ~1e-7 relative; the bf16-only update is off by ~1e-3.
    torch.testing.assert_close(state["weight"].double(), reference["weight"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(teacher.model.weight, state["weight"].to(torch.bfloat16), rtol=0, atol=0)
    moved = ((state["weight"].double() - start) * direction).mean()
    expected = ((reference["weight"] - start) * direction).mean()
    assert moved == pytest.approx(float(expected), rel=1e-3) and expected > 5e-5
    # Resume: a fresh teacher loaded from the state continues from the fp32 average, not its bf16 copy.
    again = make_teacher("ema", torch.nn.Linear(64, 64), ema_rate=0.05, dtype=torch.bfloat16)
    again.load_state_dict(state)
    torch.testing.assert_close(again.state_dict()["weight"], state["weight"], rtol=0, atol=0)
