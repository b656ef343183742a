"""The vLLM rollout engine: alignment with the trainer, weight pushes, clear errors.

Tests marked `vllm` need the vLLM environment (scripts/setup_vllm.sh) and skip without it
(CI sets VOPD_REQUIRE_VLLM=1, so there they fail instead). They serve a checkpoint written by
`vopd train` from the toy base model: the CPU build of vLLM 0.32 has attention kernels for
head_dim >= 32 only ("Unsupported CPU attention configuration: head_dim=16"), which the toy base
(hidden 128, 4 heads) meets and the default tiny Qwen2-VL (head_dim 16) does not.

Tolerance: fp32 on both sides; engine and trainer log-probs of the same tokens agree to 2e-3
(measured max difference ~1e-5: different kernels, same arithmetic).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from support.reference import teacher_forced_logp
from support.vllm_server import user_server

import vopd.toyworld  # noqa: F401  (registers the toy-base model spec)
from vopd.config import RolloutConfig, load_config
from vopd.knobs import ConfigError
from vopd.models import build_prompts, load_model, vision_token_ids
from vopd.rollout import HFGenerateEngine
from vopd.rollout_vllm import (
    EngineMismatchError,
    VLLMServerEngine,
    _free_port,
    check_engine_prompt,
    qwen_images_from_pixels,
    server_command,
    server_env,
)

TEXTS = ["What color is the circle?", "How many boxes are there?"]
LOGP_ATOL = 2e-3


def _images() -> list[Image.Image]:
    a = Image.new("RGB", (112, 112), "white")
    ImageDraw.Draw(a).ellipse((20, 30, 44, 54), fill="blue")
    b = Image.new("RGB", (84, 56), "white")
    ImageDraw.Draw(b).rectangle((10, 10, 30, 30), fill="green")
    return [a, b]


# ---------------------------------------------------------------- no vLLM needed


def test_images_rebuilt_from_pixel_values_reprocess_identically(tiny_qwen2_vl, tiny_images):
    _, processor = tiny_qwen2_vl
    batch = build_prompts(processor, list(tiny_images), TEXTS)
    images = qwen_images_from_pixels(batch, processor)  # raises unless re-processing reproduces pixel_values
    grid = batch["image_grid_thw"].tolist()
    assert [im.size for im in images] == [(w * 14, h * 14) for _, h, w in grid]


def test_prompt_check_names_the_image_token_count():
    check_engine_prompt([1, 5, 5, 2], [1, 5, 5, 2], 5)
    with pytest.raises(
        EngineMismatchError, match="image-token count differs: the trainer's prompt has 2 image tokens, the engine's 3"
    ):
        check_engine_prompt([1, 5, 5, 2], [1, 5, 5, 5, 2], 5)
    with pytest.raises(EngineMismatchError, match="differ from the trainer's at position 2"):
        check_engine_prompt([1, 5, 7, 2], [1, 5, 8, 2], 5)


def test_engine_knob_is_validated_and_missing_vllm_env_is_a_clear_error(tmp_path, tiny_qwen2_vl, tiny_images):
    with pytest.raises(ConfigError, match=re.escape("rollout.engine='sglang' is not one of hf | vllm")):
        load_config(None, ["rollout.engine=sglang"])
    model, processor = tiny_qwen2_vl
    engine = VLLMServerEngine(processor, work_dir=tmp_path, python=str(tmp_path / "nope" / "python"))
    with pytest.raises(FileNotFoundError, match="scripts/setup_vllm.sh"):
        engine.sample(model, build_prompts(processor, list(tiny_images), TEXTS), RolloutConfig(n=1, max_new_tokens=2))


def test_a_server_that_failed_to_start_leaves_no_url_behind(tmp_path, tiny_qwen2_vl):
    """An interpreter without vLLM: the server exits at once. The engine must not keep its URL, or the
    next sync would take the dead server for a user's one (push to it) instead of starting a new one."""
    model, processor = tiny_qwen2_vl
    engine = VLLMServerEngine(processor, work_dir=tmp_path, python=sys.executable, startup_timeout=120)
    with pytest.raises(RuntimeError, match="the vLLM server exited"):
        engine.start(model)
    assert engine.url is None and engine.process is None


@pytest.mark.slow
def test_fsdp2_without_the_vllm_environment_fails_on_every_rank(tmp_path):
    """Rank 0 finds no vLLM interpreter before the first (collective) snapshot: both ranks stop with
    the message, none waits in a collective for a server that will never start."""
    args = [
        "model.path=toy-base",
        "data.train=toyworld:4:0",
        "rollout.n=1",
        "rollout.max_new_tokens=2",
        "prompts_per_step=2",
        "micro_batch_prompts=1",
        "max_steps=1",
        "report_to=[jsonl]",
        "threads=1",
        "health.every=0",
        "device=cpu",
        "parallel.strategy=fsdp2",
        "rollout.engine=vllm",
        f"rollout.vllm_python={tmp_path / 'nope' / 'python'}",
        f"output_dir={tmp_path / 'run'}",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "vopd.cli", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("no vLLM interpreter at") == 2, proc.stderr[-3000:]  # one line per rank


# ---------------------------------------------------------------- with the vLLM environment


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory, vllm_python) -> Path:
    """A checkpoint written by `vopd train` (one step from the toy base model)."""
    from vopd.trainer import train

    out = tmp_path_factory.mktemp("vllm_train")
    cfg = load_config(
        None,
        [
            "model.path=toy-base",
            "data.train=toyworld:4:0",
            "rollout.n=2",
            "rollout.max_new_tokens=4",
            "prompts_per_step=2",
            "micro_batch_prompts=2",
            "max_steps=1",
            "report_to=[jsonl]",
            "threads=1",
            "health.every=0",
            f"output_dir={out}",
        ],
    )
    return train(cfg).checkpoint


@pytest.fixture(scope="module")
def server_url(toy_checkpoint, vllm_python, tmp_path_factory):
    """A user-started vLLM server (the engine's connect mode) on the `vopd train` checkpoint."""
    work = tmp_path_factory.mktemp("vllm_server")
    cmd = server_command(
        vllm_python,
        toy_checkpoint,
        _free_port(),
        work / "template.jinja",
        extra=["--max-model-len", "512", "--enforce-eager"],
    )
    with user_server(cmd, server_env(), work / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def policy(toy_checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the image-only fallback notice (no torchvision here)
        return load_model(str(toy_checkpoint))


@pytest.mark.vllm
def test_checkpoint_loads_whole_with_stock_classes_in_vllm_env(toy_checkpoint, vllm_python):
    code = (
        "import sys\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "m = AutoModelForImageTextToText.from_pretrained(sys.argv[1])\n"
        "p = AutoProcessor.from_pretrained(sys.argv[1])\n"
        "assert 'vopd' not in sys.modules\n"
        "print(type(m).__name__, type(p).__name__, type(p.image_processor).__name__, "
        "type(p.video_processor).__name__)\n"
    )
    done = subprocess.run(
        [str(vllm_python), "-c", code, str(toy_checkpoint)],
        capture_output=True,
        text=True,
        env=server_env(),
        timeout=600,
        cwd=str(toy_checkpoint),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    model_cls, proc_cls, image_cls, video_cls = done.stdout.split()[-4:]
    assert (model_cls, proc_cls) == ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor")
    assert image_cls.startswith("Qwen2VLImageProcessor") and video_cls == "Qwen2VLVideoProcessor"


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_engine_logprobs_equal_trainer_logprobs(server_url, policy, tmp_path, temperature, top_p):
    model, processor = policy
    engine = VLLMServerEngine(processor, work_dir=tmp_path, url=server_url)
    batch = build_prompts(processor, _images(), TEXTS)
    ro = engine.sample(
        model, batch, RolloutConfig(n=4, temperature=temperature, top_p=top_p, max_new_tokens=12), generator_seed=3
    )
    assert ro.response_ids_B_T.shape[0] == 8 and ro.mask_B_T.any(dim=1).all()
    ref = teacher_forced_logp(
        model, batch, ro, vision_token_ids(processor, model), temperature=temperature, top_p=top_p
    )
    got, want = ro.sampler_logp_B_T[ro.mask_B_T].double(), ref[ro.mask_B_T]
    assert torch.isfinite(want).all()  # every engine token lies inside the trainer's sampling support
    torch.testing.assert_close(got, want, atol=LOGP_ATOL, rtol=0)
    assert not set(ro.response_ids_B_T[ro.mask_B_T].tolist()) & set(vision_token_ids(processor, model))


@pytest.mark.vllm
@pytest.mark.slow
def test_after_a_weight_push_engine_greedy_equals_hf_greedy(server_url, policy, tmp_path):
    model, processor = policy
    model = copy.deepcopy(model)
    engine = VLLMServerEngine(processor, work_dir=tmp_path, url=server_url)
    batch = build_prompts(processor, _images(), TEXTS)
    greedy = RolloutConfig(n=1, temperature=0.0, max_new_tokens=10)
    before = engine.sample(model, batch, greedy)
    assert torch.equal(
        before.response_ids_B_T, HFGenerateEngine(processor).sample(model, batch, greedy).response_ids_B_T
    )
    pushes = engine.pushes
    torch.manual_seed(0)
    with torch.no_grad():  # an "optimiser step": every parameter changes in place
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    after = engine.sample(model, batch, greedy)
    assert engine.pushes == pushes + 1 and engine.last_push_seconds > 0
    hf_after = HFGenerateEngine(processor).sample(model, batch, greedy)
    assert torch.equal(after.response_ids_B_T, hf_after.response_ids_B_T)
    assert not torch.equal(after.response_ids_B_T, before.response_ids_B_T)  # the push really changed the engine


@pytest.mark.vllm
@pytest.mark.slow
def test_different_image_token_count_is_a_clear_error(server_url, policy, tmp_path):
    model, processor = policy
    trainer_processor = copy.deepcopy(processor)
    # The trainer keeps 224 px images (64 image tokens); the served folder's processor caps at its own
    # max_pixels and would expand the same image to fewer tokens.
    served_max = trainer_processor.image_processor.size["longest_edge"]
    trainer_processor.image_processor.size = {"shortest_edge": 784, "longest_edge": 4 * 224 * 224}
    big = Image.new("RGB", (448, 448), "white")
    ImageDraw.Draw(big).ellipse((100, 100, 300, 300), fill="red")
    batch = build_prompts(trainer_processor, [big], TEXTS[:1])
    assert int((batch["input_ids"] == processor.image_token_id).sum()) * 28 * 28 > served_max
    engine = VLLMServerEngine(trainer_processor, work_dir=tmp_path, url=server_url)
    with pytest.raises(EngineMismatchError, match="image-token count differs"):
        engine.sample(model, batch, RolloutConfig(n=1, max_new_tokens=2))


@pytest.mark.vllm
@pytest.mark.slow
def test_training_with_the_vllm_engine_end_to_end(tmp_path, vllm_python):
    """vopd starts its own server (start mode), pushes weights every step, rollout correction ~1."""
    from vopd.trainer import train

    cfg = load_config(
        None,
        [
            "model.path=toy-base",
            "data.train=toyworld:8:0",
            "rollout.n=2",
            "rollout.max_new_tokens=6",
            "prompts_per_step=2",
            "micro_batch_prompts=2",
            "max_steps=3",
            "report_to=[jsonl]",
            "threads=1",
            "health.every=0",
            "optim.lr=1e-3",
            "optim.warmup_steps=1",
            "loss.rollout_correction=true",
            "rollout.engine=vllm",
            f"rollout.vllm_python={vllm_python}",
            "rollout.vllm_args=[--max-model-len, '512', --enforce-eager]",
            f"output_dir={tmp_path}",
        ],
    )
    result = train(cfg)
    hist = result.history
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(h["divergence"])) for h in hist)
    assert hist[0]["time_weight_sync"] == 0.0 and all(h["time_weight_sync"] > 0 for h in hist[1:])
    # Trainer and engine log-probs agree, so the correction weight min(pi_trainer / pi_engine, clip) is ~1.
    assert all(abs(h["rollout_weight"] - 1.0) < 1e-2 for h in hist), [h["rollout_weight"] for h in hist]
    assert (
        json.loads((result.checkpoint / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    )


@pytest.mark.vllm
@pytest.mark.slow
def test_fsdp2_two_processes_train_with_one_server_and_push_the_sharded_student(tmp_path, vllm_python):
    """parallel.strategy=fsdp2 at 2 gloo processes: rank 0 starts one server, both ranks sample from it;
    after step 1 every rank writes its own shards into the snapshot and the server reloads it. The
    pushed snapshot is the student after step 1 (checkpoint-1, gathered by save_pretrained) bit for
    bit, and the engine's log-probs on both ranks' tokens match the trainer's (rollout_weight ~1)."""
    from safetensors.torch import load_file

    torchrun = Path(sys.executable).with_name("torchrun")
    args = [
        "model.path=toy-base",
        "data.train=toyworld:8:0",
        "rollout.n=2",
        "rollout.max_new_tokens=6",
        "prompts_per_step=4",
        "micro_batch_prompts=1",
        "max_steps=2",
        "report_to=[jsonl]",
        "threads=1",
        "health.every=0",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "loss.rollout_correction=true",
        "device=cpu",
        "parallel.strategy=fsdp2",
        "checkpoint.format=hf",
        "save_every=1",
        "keep_checkpoints=0",
        "rollout.engine=vllm",
        f"rollout.vllm_python={vllm_python}",
        "rollout.vllm_args=[--max-model-len, '512', --enforce-eager]",
        "rollout.vllm_start_timeout=900",  # two trainer processes share the cores with the starting server
        f"output_dir={tmp_path}",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "vopd.cli", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    hist = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    hist = [h for h in hist if "divergence" in h]
    assert len(hist) == 2 and hist[0]["time_weight_sync"] == 0.0 and hist[1]["time_weight_sync"] > 0
    assert all(abs(h["rollout_weight"] - 1.0) < 1e-2 for h in hist), [h["rollout_weight"] for h in hist]
    assert len(list(tmp_path.rglob("vllm_server.log"))) == 1  # one server for both ranks
    pushed = load_file(tmp_path / "vllm" / "policy" / "model.safetensors")
    step1 = load_file(tmp_path / "checkpoint-1" / "model.safetensors")
    step2 = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert pushed.keys() == step1.keys()  # save_pretrained's names: what the server loaded at start
    assert all(torch.equal(pushed[k], step1[k]) for k in step1)
    assert any(not torch.equal(step2[k], step1[k]) for k in step1)  # step 2 moved the weights (not pushed)
