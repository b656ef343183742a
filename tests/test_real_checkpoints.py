"""The path a real user takes, on the real files of Qwen2.5-VL-7B-Instruct and Qwen3-VL-8B-Instruct.

`tests/data/real_models/` holds those checkpoints' small files unchanged (config, tokenizer,
chat template, processor and generation settings; no weights). `vopd model random` turns each
into a runnable model with random weights, shrunk to 2 text layers of width 128 and one vision
block (head dimensions, vocabulary, special-token ids, rope sections and patch settings stay
real), and every test below runs on that folder: the real 151k-token tokenizer, the real chat
template, the real pixel budget, the real stop tokens and box formats.

The reference numbers come from the checkpoints' published facts, not from the code under test:
the token ids and counts from the vocabulary files, the pixel budgets from Qwen's
``smart_resize`` (qwen-vl-utils) written out below, the box frames from the Qwen READMEs
(docs/real_checkpoints.md cites each).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from vopd.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "real_models"

# Facts of each real folder (docs/real_checkpoints.md): the tokenizer's length, the config's vocabulary,
# one visual token's side in pixels (patch x merge), the pixel budget, and the vision head dimension.
FACTS = {
    "qwen2_5_vl_7b_instruct": {
        "model_type": "qwen2_5_vl",
        "tokens": 151_665,
        "vocab_size": 152_064,
        "token_px": 28,
        "min_pixels": 3136,
        "max_pixels": 12_845_056,
        "vision_head_dim": 80,
        "mrope_section": [16, 24, 24],
    },
    "qwen3_vl_8b_instruct": {
        "model_type": "qwen3_vl",
        "tokens": 151_669,
        "vocab_size": 151_936,
        "token_px": 32,
        "min_pixels": 65_536,
        "max_pixels": 16_777_216,
        "vision_head_dim": 72,
        "mrope_section": [24, 20, 20],
    },
}
FOLDERS = sorted(FACTS)
SPECIAL = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
SHRINK = ["--layers", "2", "--vision-layers", "1", "--hidden", "128"]


def make_random(folder: str, out: Path) -> Path:
    """`vopd model random` on a real folder, shrunk (the vision tower to two heads of its real size)."""
    vision_hidden = str(2 * FACTS[folder]["vision_head_dim"])
    code = cli_main(
        ["model", "random", str(REAL / folder), "--out", str(out), *SHRINK, "--vision-hidden", vision_hidden]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module", params=FOLDERS)
def real_dir(request, tmp_path_factory) -> tuple[str, Path]:
    """(real folder name, the random model built from it by `vopd model random`)."""
    return request.param, make_random(request.param, tmp_path_factory.mktemp(request.param) / "model")


# ---------------------------------------------------------------- vopd model random


def test_random_model_keeps_the_real_files_and_ids(real_dir):
    from transformers import AutoConfig, AutoTokenizer

    folder, out = real_dir
    facts, src = FACTS[folder], REAL / folder
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == facts["tokens"]
    assert {s: tok.convert_tokens_to_ids(s) for s in SPECIAL} == SPECIAL
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert (out / "preprocessor_config.json").read_bytes() == (src / "preprocessor_config.json").read_bytes()

    real, made = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(out)
    assert made.model_type == facts["model_type"] and made.architectures == real.architectures
    ids = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}
    ids |= {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    for key, token in ids.items():
        assert getattr(made, key) == getattr(real, key) == SPECIAL[token]
    rt, mt = real.get_text_config(), made.get_text_config()
    assert mt.vocab_size == rt.vocab_size == facts["vocab_size"]
    assert (mt.hidden_size, mt.num_hidden_layers, mt.head_dim, mt.num_attention_heads) == (128, 2, 128, 1)
    assert mt.rope_parameters["mrope_section"] == rt.rope_parameters["mrope_section"] == facts["mrope_section"]
    assert sum(facts["mrope_section"]) == mt.head_dim // 2  # the sections still tile the rotated half
    assert (mt.bos_token_id, mt.eos_token_id) == (rt.bos_token_id, rt.eos_token_id)
    assert made.tie_word_embeddings == real.tie_word_embeddings is False
    rv, mv = real.vision_config, made.vision_config
    for key in ("patch_size", "spatial_merge_size", "temporal_patch_size"):
        assert getattr(mv, key) == getattr(rv, key)
    assert mv.patch_size * mv.spatial_merge_size == facts["token_px"]
    assert (mv.depth, mv.out_hidden_size, mv.hidden_size // mv.num_heads) == (1, 128, facts["vision_head_dim"])

    record = json.loads((out / "vopd_random_model.json").read_text())
    assert record["source_config_sha256"] == hashlib.sha256((src / "config.json").read_bytes()).hexdigest()
    assert record["hidden"] == 128 and record["dtype"] == "bfloat16"  # the release's dtype, kept


def test_shrink_maps_per_layer_settings():
    from vopd.random_model import shrink_config

    qwen25 = json.loads((REAL / "qwen2_5_vl_7b_instruct" / "config.json").read_text())
    qwen25["vision_config"]["depth"] = 32
    small = shrink_config(qwen25, layers=3, vision_layers=4, hidden=512)
    assert small["vision_config"]["fullatt_block_indexes"] == [0, 1, 2, 3]  # 7, 15, 23, 31 of 32 -> 4 blocks
    assert shrink_config(qwen25, vision_layers=1)["vision_config"]["fullatt_block_indexes"] == [0]
    # Flat (old) layout: the top level is the text config; 28 heads / 4 KV heads of 128 -> 4 / 1.
    assert (small["num_attention_heads"], small["num_key_value_heads"], small["head_dim"]) == (4, 1, 128)
    assert small["intermediate_size"] == 2688 and small["vision_config"]["out_hidden_size"] == 512
    qwen3 = json.loads((REAL / "qwen3_vl_8b_instruct" / "config.json").read_text())
    assert shrink_config(qwen3, vision_layers=3)["vision_config"]["deepstack_visual_indexes"] == [0, 1, 2]
    assert shrink_config(qwen3, vision_layers=27) == qwen3  # the real depth: nothing moves
    # A hybrid (Qwen3.5-style) pattern keeps its last layers, so a full-attention layer survives.
    hybrid = {
        "text_config": {
            "hidden_size": 2560,
            "num_hidden_layers": 8,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "intermediate_size": 9216,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 32,
            "layer_types": ["linear_attention"] * 3
            + ["full_attention"]
            + ["linear_attention"] * 3
            + ["full_attention"],
        }
    }
    text = shrink_config(hybrid, layers=2, hidden=512)["text_config"]
    assert text["layer_types"] == ["linear_attention", "full_attention"]
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (2, 1)  # the 4:1 grouping, as far as it goes
    assert (text["linear_num_key_heads"], text["linear_num_value_heads"]) == (2, 4)


def test_model_random_refuses_what_it_cannot_keep(tmp_path, capsys):
    src = str(REAL / "qwen3_vl_8b_instruct")
    assert cli_main(["model", "random", src, "--out", str(tmp_path / "a"), "--hidden", "200"]) == 1
    assert "not a multiple of the head dimension 128" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("keep me")
    assert cli_main(["model", "random", src, "--out", str(tmp_path / "b"), "--layers", "1"]) == 1
    assert "is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "b" / "mine.txt").read_text() == "keep me"
    assert cli_main(["model", "random", str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 1
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("folder", "parameters"), [("qwen2_5_vl_7b_instruct", 8_292_166_656), ("qwen3_vl_8b_instruct", 8_767_123_696)]
)
def test_memplan_counts_the_real_checkpoints_parameters_exactly(folder, parameters):
    """The checkpoints' safetensors index total_size / 2 (bf16), as published."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memplan.py"), "--config", str(REAL / folder)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0] == f"parameters: {parameters}"
    assert f"| {folder} | fsdp2 | 8 |" in done.stdout


# ---------------------------------------------------------------- prompts, pixel budgets, stops, boxes


@pytest.fixture(scope="module")
def real_model(real_dir):
    """(folder, model, processor) as every vopd command loads the random folder."""
    from vopd.models import load_model

    folder, out = real_dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the image-only processor notice: no torchvision in this environment
        model, processor = load_model(str(out))
    return folder, model, processor


def qwen_tokens(height: int, width: int, token_px: int, min_pixels: int, max_pixels: int) -> int:
    """Visual tokens of one image by Qwen's ``smart_resize`` (qwen-vl-utils): both sides rounded to
    multiples of one token's side, then scaled (aspect kept) into ``[min_pixels, max_pixels]``."""
    h = max(token_px, round(height / token_px) * token_px)
    w = max(token_px, round(width / token_px) * token_px)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(token_px, math.floor(height / beta / token_px) * token_px)
        w = max(token_px, math.floor(width / beta / token_px) * token_px)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / token_px) * token_px
        w = math.ceil(width * beta / token_px) * token_px
    return (h // token_px) * (w // token_px)


def image_tokens(batch) -> list[int]:
    return (batch["input_ids"] == SPECIAL["<|image_pad|>"]).sum(dim=1).tolist()


def box_tuple(box) -> tuple[int, int, int, int]:
    return round(box.x1), round(box.y1), round(box.x2), round(box.y2)


def test_prompts_use_the_real_chat_template(real_model):
    from vopd.models import build_prompts, chat_prompt

    folder, _, processor = real_model
    question = "What colour is the cup?"
    user = f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
    prompt = chat_prompt(processor, question)
    if folder == "qwen2_5_vl_7b_instruct":  # injects its default system prompt
        assert prompt == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + user
    else:  # Qwen3-VL-Instruct: none
        assert prompt == user
    # Neither Instruct template has a thinking switch: vopd passes none, and setting it changes nothing.
    assert "enable_thinking" not in processor.chat_template
    assert chat_prompt(processor, question, thinking=True) == chat_prompt(processor, question, thinking=False) == prompt
    from PIL import Image

    batch = build_prompts(processor, [Image.new("RGB", (64, 64), "white")], [question])
    ids = batch["input_ids"][0].tolist()
    assert ids[0] == SPECIAL["<|im_start|>"] and ids[-3:] == processor.tokenizer.encode("<|im_start|>assistant\n")
    assert processor.tokenizer.decode(ids).replace("<|image_pad|>", "") == prompt.replace("<|image_pad|>", "")


@pytest.mark.parametrize("size", [(20, 30), (300, 200), (1000, 700), (60, 1400), (4200, 4200)])
def test_image_tokens_follow_the_real_pixel_budget(real_model, size):
    """(width, height): below the minimum, ordinary, long and thin, above the maximum (16,384 tokens)."""
    from PIL import Image

    from vopd.models import build_prompts

    folder, _, processor = real_model
    facts = FACTS[folder]
    assert processor.image_processor.size["shortest_edge"] == facts["min_pixels"]
    assert processor.image_processor.size["longest_edge"] == facts["max_pixels"]
    width, height = size
    batch = build_prompts(processor, [Image.new("RGB", size, "white")], ["Describe."])
    want = qwen_tokens(height, width, facts["token_px"], facts["min_pixels"], facts["max_pixels"])
    assert image_tokens(batch) == [want]
    assert int(batch["image_grid_thw"].prod()) == 4 * want  # 2x2 patches merge into one token
    assert facts["min_pixels"] // facts["token_px"] ** 2 <= want <= 16_384


def test_crop_and_full_image_get_the_token_counts_of_the_real_processor(real_model):
    from PIL import Image, ImageDraw

    from vopd.config import ViewConfig
    from vopd.data import PairCollator, ViewDataset
    from vopd.records import Box, Sample

    folder, _, processor = real_model
    facts = FACTS[folder]
    image = Image.new("RGB", (1280, 960), "white")
    ImageDraw.Draw(image).rectangle((700, 400, 760, 440), fill="red")
    samples = [
        Sample("small", image, "What colour is the mark?", boxes=[Box(700, 400, 760, 440)]),
        Sample("wide", image, "What is there?", boxes=[Box(100, 100, 1100, 300)]),
    ]
    items = [ViewDataset(samples, ViewConfig())[i] for i in range(2)]
    pair = PairCollator(processor, thinking=None, max_prompt_tokens=None)(items)
    budget = (facts["token_px"], facts["min_pixels"], facts["max_pixels"])
    assert image_tokens(pair.student) == [qwen_tokens(960, 1280, *budget)] * 2  # the full image, as given
    assert image_tokens(pair.teacher) == [qwen_tokens(it.teacher.height, it.teacher.width, *budget) for it in items]
    assert items[0].teacher.size == (240, 160)  # the 60x40 box with context 0.5 -> 120x80, zoomed 2x
    assert image_tokens(pair.teacher)[0] < image_tokens(pair.student)[0]


@pytest.mark.parametrize("share_prefill", [True, False], ids=["shared-prefill", "generate"])
def test_sampling_stops_on_the_real_stop_tokens(real_model, share_prefill):
    from conftest import with_bias
    from PIL import Image
    from support.reference import teacher_forced_logp

    from vopd.config import RolloutConfig
    from vopd.models import append_responses, build_prompts, repeat_prompts, response_logits, vision_token_ids
    from vopd.rollout import HFGenerateEngine, eos_token_ids

    folder, model, processor = real_model
    stops = json.loads((REAL / folder / "generation_config.json").read_text())["eos_token_id"]
    assert stops == [SPECIAL["<|im_end|>"], SPECIAL["<|endoftext|>"]]
    assert model.generation_config.eos_token_id == stops and set(stops) <= set(eos_token_ids(processor, model))
    batch = build_prompts(processor, [Image.new("RGB", (64, 64), "white")] * 2, ["Say hi.", "Count."])
    engine = HFGenerateEngine(processor, share_prefill=share_prefill)
    # The real generation_config also says top_k (20 for Qwen3-VL) / top_p / repetition_penalty: vopd
    # samples from its own rollout settings only: plain temperature 1 over the whole vocabulary.
    torch.manual_seed(0)
    free = engine.sample(model, batch, RolloutConfig(n=2, temperature=1.0, max_new_tokens=6))
    want = teacher_forced_logp(model, batch, free, vision_token_ids(processor, model))
    torch.testing.assert_close(free.sampler_logp_B_T[free.mask_B_T].double(), want[free.mask_B_T], atol=1e-4, rtol=0)
    T = free.response_ids_B_T.shape[1]
    inputs = append_responses(repeat_prompts(batch, 2), free.response_ids_B_T, free.mask_B_T)
    with torch.no_grad():
        logits = response_logits(model, inputs, T)
    rank = (logits > logits.gather(2, free.response_ids_B_T[..., None])).sum(-1)[free.mask_B_T]
    assert int(rank.max()) > 1000  # a near-flat random model: a top-k of 20 would keep every rank below 20
    biased = with_bias(model, {})
    for stop in stops:
        with torch.no_grad():
            biased.get_output_embeddings().bias.zero_()[stop] = 40.0
        ro = engine.sample(biased, batch, RolloutConfig(n=2, temperature=1.0, max_new_tokens=6))
        assert ro.response_ids_B_T[:, 0].tolist() == [stop] * 4
        assert ro.mask_B_T.sum(dim=1).tolist() == [1] * 4  # the stop token is the response's last


def test_grounding_reads_the_real_box_formats(real_model):
    """Qwen2.5-VL: JSON bbox_2d in pixels of the resized input; Qwen3-VL: relative 0-1000; the
    Qwen2-VL box tokens are single real special tokens, and that syntax is read in the family's frame too."""
    from PIL import Image
    from support.scripted import ScriptedEngine

    from vopd.proposals.grounding import INPUT_PIXELS, RELATIVE_1000, ground, grounding_format
    from vopd.records import Sample

    folder, model, processor = real_model
    tok = processor.tokenizer
    fmt = grounding_format(model)
    image = Image.new("RGB", (1000, 700), "white")  # Qwen2.5-VL input: 1008 x 700 (36 x 25 tokens of 28 px)
    if folder == "qwen2_5_vl_7b_instruct":
        assert fmt.frame == INPUT_PIXELS
        corners = (504, 350, 756, 525)
    else:
        assert fmt.frame == RELATIVE_1000
        corners = (500, 500, 750, 750)
    x1, y1, x2, y2 = corners
    answer = f'```json\n[{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "cup"}}]\n```'
    tokens = f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
    ids = tok.encode(tokens)
    assert ids[0] == SPECIAL["<|box_start|>"] and ids[-1] == SPECIAL["<|box_end|>"]
    engine = ScriptedEngine(processor, [answer, tokens])
    samples = [Sample(str(i), image, "Where is the cup?") for i in range(2)]
    found = ground(model, processor, engine, samples, batch_size=1)
    assert [g.status for g in found] == ["ok", "ok"]
    # Both syntaxes, read in the family's frame, give the same region of the 1000 x 700 image.
    assert box_tuple(found[0].box) == box_tuple(found[1].box) == (500, 350, 750, 525)
    assert "bbox_2d" in engine.prompts[0] and "<|vision_start|><|image_pad|>" in engine.prompts[0]


# ---------------------------------------------------------------- train, save, load anywhere, serve, evaluate


@pytest.fixture(scope="module")
def trained(real_dir, tmp_path_factory) -> tuple[str, Path]:
    """Two `vopd train` steps of the tiny CPU recipe on the random folder: (folder, checkpoint-2)."""
    folder, model_dir = real_dir
    out = tmp_path_factory.mktemp(f"{folder}_run") / "run"
    overrides = [
        f"model.path={model_dir}",
        "max_steps=2",
        "save_every=2",
        f"output_dir={out}",
        "prompts_per_step=2",
        "micro_batch_prompts=2",
        "rollout.max_new_tokens=4",
        "health.every=0",
        "threads=1",
        "report_to=[jsonl]",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(["train", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), *overrides]) == 0
    return folder, out / "checkpoint-2"


@pytest.mark.slow
def test_two_training_steps_save_a_checkpoint_with_the_real_files(trained):
    from transformers import AutoTokenizer, GenerationConfig

    folder, checkpoint = trained
    steps = [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(math.isfinite(s["divergence"]) for s in steps)
    assert all(s["skipped"] == 0 for s in steps)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    assert (
        len(tok) == FACTS[folder]["tokens"] and tok.convert_tokens_to_ids("<|image_pad|>") == SPECIAL["<|image_pad|>"]
    )
    assert GenerationConfig.from_pretrained(checkpoint).eos_token_id == [
        SPECIAL["<|im_end|>"],
        SPECIAL["<|endoftext|>"],
    ]


STOCK_LOAD = """
import sys
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
m = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
p = AutoProcessor.from_pretrained(sys.argv[1])
assert "vopd" not in sys.modules
msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
text = p.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
batch = p(images=[Image.new("RGB", (300, 200), "white")], text=[text], return_tensors="pt")
out = m.generate(**batch, max_new_tokens=2, do_sample=False)
n = int((batch["input_ids"] == p.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
print(type(m).__name__, type(p).__name__, type(p.video_processor).__name__, len(p.tokenizer), n, out.shape[1])
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_checkpoint_loads_in_stock_transformers_without_vopd(trained, vllm_python):
    import subprocess

    from vopd.rollout_vllm import server_env

    folder, checkpoint = trained
    done = subprocess.run(
        [str(vllm_python), "-c", STOCK_LOAD, str(checkpoint)],
        capture_output=True,
        text=True,
        env=server_env(),
        timeout=600,
        cwd=str(checkpoint),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    model_cls, proc_cls, video_cls, tokens, image_tokens_, length = done.stdout.split()[-6:]
    want = {
        "qwen2_5_vl_7b_instruct": (
            "Qwen2_5_VLForConditionalGeneration",
            "Qwen2_5_VLProcessor",
            "Qwen2VLVideoProcessor",
        ),
        "qwen3_vl_8b_instruct": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    }[folder]
    assert (model_cls, proc_cls, video_cls) == want
    facts = FACTS[folder]
    assert int(tokens) == facts["tokens"]
    assert int(image_tokens_) == qwen_tokens(200, 300, facts["token_px"], facts["min_pixels"], facts["max_pixels"])


@pytest.mark.slow
def test_gap_and_eval_run_on_the_checkpoint(trained, tmp_path):
    from support import published as pub

    folder, checkpoint = trained
    assert cli_main(["data", "toyworld", "--n", "4", "--seed", "1", "--out", str(tmp_path / "scenes")]) == 0
    gap_out = tmp_path / "gap"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli_main(
            ["gap", str(tmp_path / "scenes"), "--model", str(checkpoint), "--out", str(gap_out)]
            + ["--max-new-tokens", "4", "--n-boot", "100", "--allow-failures"]
        )
    assert code == 0
    result = json.loads((gap_out / "gap.json").read_text())
    assert result["n_questions"] == 4 and set(result["views"]) == {"full", "crop"}
    vstar = pub.write_vstar_snapshot(tmp_path / "vstar", {"direct_attributes": [("red", ["red", "green"])] * 2})
    eval_out = tmp_path / "eval"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli_main(
            ["eval", f"vstar={vstar}", "--backend", "hf", "--model", str(checkpoint), "--out", str(eval_out)]
            + ["--max-new-tokens", "4", "--allow-failures"]
        )
    assert code == 0
    predictions = [json.loads(line) for line in (eval_out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_the_checkpoint_with_the_trainers_prompt_ids(trained, vllm_python, tmp_path):
    """The engine refuses to sample unless the server's prompt ids equal the trainer's (real
    tokenizer, real template, real pixel budget); its log-probs equal the trainer's."""
    import torch
    from PIL import Image, ImageDraw
    from support.reference import teacher_forced_logp

    from vopd.config import RolloutConfig
    from vopd.models import build_prompts, load_model, vision_token_ids
    from vopd.rollout_vllm import VLLMServerEngine

    folder, checkpoint = trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, processor = load_model(str(checkpoint))
    image = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(image).ellipse((40, 40, 120, 120), fill="blue")
    batch = build_prompts(processor, [image, image.crop((0, 0, 150, 150))], ["What colour?", "How many circles?"])
    engine = VLLMServerEngine(
        processor,
        work_dir=tmp_path,
        python=str(vllm_python),
        server_args=["--max-model-len", "2048", "--enforce-eager"],
        # vLLM profiles the real budget's largest image (16,384 tokens) at start: minutes on a busy CPU.
        startup_timeout=1200,
    )
    try:
        ro = engine.sample(model, batch, RolloutConfig(n=2, temperature=1.0, max_new_tokens=6), generator_seed=1)
    finally:
        engine.close()
    want = teacher_forced_logp(model, batch, ro, vision_token_ids(processor, model))
    torch.testing.assert_close(ro.sampler_logp_B_T[ro.mask_B_T].double(), want[ro.mask_B_T], atol=2e-3, rtol=0)
