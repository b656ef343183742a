"""The vLLM rollout engine with a LoRA student: the server serves the base, pushes send the adapter.

Tests marked `vllm` need the vLLM environment and skip without it (CI sets VOPD_REQUIRE_VLLM=1,
so there they fail instead); see tests/test_vllm_engine.py for the toy base model they serve and
the log-prob tolerance (fp32 both sides, measured differences ~1e-6).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from support.reference import teacher_forced_logp
from support.vllm_server import user_server

import vopd.toyworld  # noqa: F401  (registers the toy-base model spec)
from vopd.config import RolloutConfig, load_config
from vopd.lora import STUDENT, TEACHER, adapter_parameters, apply_lora
from vopd.models import build_prompts, load_model, vision_token_ids
from vopd.rollout_vllm import SERVED_NAME, VLLMServerEngine
from vopd.vllm_lora import AdapterPush, lora_server_args, write_base_snapshot

TEXTS = ["What color is the circle?", "How many boxes are there?"]
LOGP_ATOL = 2e-3  # as tests/test_vllm_engine.py
CPU_SERVER_ARGS = ["--max-model-len", "512", "--enforce-eager"]


def _images() -> list[Image.Image]:
    a = Image.new("RGB", (112, 112), "white")
    ImageDraw.Draw(a).ellipse((20, 30, 44, 54), fill="blue")
    b = Image.new("RGB", (84, 56), "white")
    ImageDraw.Draw(b).rectangle((10, 10, 30, 30), fill="green")
    return [a, b]


def _lora(r: int, targets: list[str] | None = None):
    overrides = [f"lora.r={r}"] + ([f"lora.target_modules=[{','.join(targets)}]"] if targets else [])
    return load_config(None, overrides).lora


# ---------------------------------------------------------------- no vLLM needed


def test_vllm_with_lora_is_a_valid_config():
    cfg = load_config(None, ["rollout.engine=vllm", "lora.r=8"])
    assert cfg.rollout.engine == "vllm" and cfg.lora.r == 8


def test_server_lora_rank_is_the_next_rank_vllm_accepts():
    assert lora_server_args(4)[:3] == ["--enable-lora", "--max-lora-rank", "8"]
    assert lora_server_args(16)[2] == "16" and lora_server_args(33)[2] == "64"
    with pytest.raises(ValueError, match="lora.r=600 is above the largest LoRA rank vLLM serves"):
        lora_server_args(600)


def test_adapter_on_the_vision_tower_is_refused_naming_the_module(tmp_path, tiny_qwen2_vl):
    model, processor = tiny_qwen2_vl
    peft_model = apply_lora(copy.deepcopy(model), _lora(4, ["q_proj", "qkv"]), ema_adapter=False)
    with pytest.raises(ValueError, match=r"the adapter is on model\.visual\.blocks\.0\.attn\.qkv \(2 module"):
        VLLMServerEngine(processor, work_dir=tmp_path, adapters=peft_model)
    language_only = apply_lora(copy.deepcopy(model), _lora(4), ema_adapter=True)  # the default targets
    VLLMServerEngine(processor, work_dir=tmp_path, adapters=language_only)
    too_wide = apply_lora(copy.deepcopy(model), _lora(600), ema_adapter=False)
    with pytest.raises(ValueError, match="lora.r=600 is above the largest LoRA rank vLLM serves"):
        VLLMServerEngine(processor, work_dir=tmp_path, adapters=too_wide)  # before any server starts


def test_sharded_model_with_adapters_is_refused_before_any_collective(tmp_path, tiny_qwen2_vl, monkeypatch):
    """The config refuses fsdp2 + LoRA; an engine given both anyway must not push the peft model's full
    state (lora_A/base_layer names the server cannot load) while its requests name no adapter."""
    import vopd.rollout_vllm as rv

    model, processor = tiny_qwen2_vl
    peft_model = apply_lora(copy.deepcopy(model), _lora(4), ema_adapter=False)
    engine = VLLMServerEngine(processor, work_dir=tmp_path, adapters=peft_model)
    monkeypatch.setattr(rv, "is_sharded", lambda _: True)  # no process group: a collective would fail otherwise
    with pytest.raises(ValueError, match="LoRA student .* FSDP2-sharded model is not supported"):
        engine.sample(peft_model.base_model.model, None, RolloutConfig(n=1, max_new_tokens=2))


def test_adapter_push_loads_the_new_name_then_unloads_the_old_one(tmp_path, tiny_qwen2_vl):
    """The route sequence against a scripted server, the fallback for a name an earlier run left
    loaded, and what triggers a push (the student adapter, not the ema teacher's)."""
    model, _ = tiny_qwen2_vl
    policy = copy.deepcopy(model)
    peft_model = apply_lora(policy, _lora(4), ema_adapter=True)
    push = AdapterPush(peft_model, tmp_path, "srv")
    calls: list[tuple[str, str | None]] = []
    left_loaded = {"srv-lora-2"}  # e.g. a user's server that served an earlier run in this folder

    def post(route: str, body: dict | None) -> str:
        name = (body or {}).get("lora_name")
        calls.append((route, name))
        if route == "/v1/load_lora_adapter":
            if name in left_loaded:
                raise RuntimeError(f"HTTP 400: The lora adapter '{name}' has already been loaded.")
            assert (Path(body["lora_path"]) / "adapter_model.safetensors").is_file()
        if route == "/v1/unload_lora_adapter":
            left_loaded.discard(name)
        return "Success"

    push.push(post)
    assert calls == [("/v1/load_lora_adapter", "srv-lora-1"), ("/reset_prefix_cache", None)]
    assert push.name == "srv-lora-1" and push.last_bytes > 0
    calls.clear()
    push.push(post)
    assert calls == [
        ("/v1/load_lora_adapter", "srv-lora-2"),  # refused: already loaded
        ("/v1/unload_lora_adapter", "srv-lora-2"),
        ("/v1/load_lora_adapter", "srv-lora-2"),
        ("/v1/unload_lora_adapter", "srv-lora-1"),
        ("/reset_prefix_cache", None),
    ]
    assert sorted(p.name for p in tmp_path.glob("adapter-*")) == ["adapter-2"]
    saved = load_file(tmp_path / "adapter-2" / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved) and not any(".ema" in k for k in saved)
    before = push.fingerprint()
    with torch.no_grad():
        next(iter(adapter_parameters(policy, TEACHER).values())).add_(1.0)  # the ema teacher moved
    assert push.fingerprint() == before
    with torch.no_grad():
        next(iter(adapter_parameters(policy, STUDENT).values())).add_(1.0)  # the student moved
    assert push.fingerprint() != before
    assert push.advance() == "srv-lora-3"  # another training process counts the main one's push


def test_base_snapshot_of_a_lora_policy_equals_the_plain_base(tmp_path, tiny_qwen2_vl):
    model, _ = tiny_qwen2_vl
    plain = copy.deepcopy(model)
    plain.save_pretrained(tmp_path / "plain", safe_serialization=True)
    policy = copy.deepcopy(model)
    apply_lora(policy, _lora(4), ema_adapter=True)
    with torch.no_grad():  # a trained adapter: must not leak into the base the server starts on
        for p in adapter_parameters(policy, STUDENT).values():
            p.normal_()
    write_base_snapshot(policy, tmp_path / "base")
    want, got = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "base" / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------- with the vLLM environment


@pytest.fixture
def lora_engine(vllm_python, tmp_path_factory):
    """The toy base with a rank-4 adapter (random B: it changes the answers) and an engine that
    starts its own LoRA server on the base at the first sample (stopped after the test: the other
    tests start their own servers, and two at once strain a small machine's memory)."""
    from vopd.toyworld.model import toy_base_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the image-only fallback notice (no torchvision here)
        model, processor = load_model(str(toy_base_path()))
    torch.manual_seed(0)
    peft_model = apply_lora(model, _lora(4), ema_adapter=True)
    with torch.no_grad():
        for name, p in adapter_parameters(model, STUDENT).items():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.eval()
    work = tmp_path_factory.mktemp("vllm_lora")
    engine = VLLMServerEngine(
        processor,
        work_dir=work,
        python=str(vllm_python),
        server_args=CPU_SERVER_ARGS,
        startup_timeout=900,  # a loaded 2-core machine can take minutes
        adapters=peft_model,
    )
    try:
        yield model, processor, engine
    finally:
        engine.close()


def _max_logp_error(model, processor, batch, ro, **sampling) -> float:
    ref = teacher_forced_logp(model, batch, ro, vision_token_ids(processor, model), **sampling)
    assert torch.isfinite(ref[ro.mask_B_T]).all()
    return float((ro.sampler_logp_B_T[ro.mask_B_T].double() - ref[ro.mask_B_T]).abs().max())


@pytest.mark.vllm
@pytest.mark.slow
def test_lora_engine_logprobs_equal_trainer_logprobs_after_an_optimiser_step(lora_engine):
    model, processor, engine = lora_engine
    batch = build_prompts(processor, _images(), TEXTS)
    sampling = RolloutConfig(n=4, temperature=1.0, max_new_tokens=12)
    first = engine.sample(model, batch, sampling, generator_seed=3)
    assert engine.pushes == 1 and engine.served_model == f"{SERVED_NAME}-lora-1"
    assert _max_logp_error(model, processor, batch, first) <= LOGP_ATOL
    base = sum(f.stat().st_size for f in engine.snapshot_dir.glob("*.safetensors"))
    assert 0 < engine.lora.last_bytes < base / 5  # the push is the adapter, not the model

    adapter = adapter_parameters(model, STUDENT)
    before = {name: p.detach().clone() for name, p in adapter.items()}
    optimiser = torch.optim.AdamW(adapter.values(), lr=0.05)
    torch.manual_seed(1)
    for p in adapter.values():
        p.grad = torch.randn_like(p)
    optimiser.step()  # bumps the adapter's version counters: the engine must push before sampling
    optimiser.zero_grad(set_to_none=True)

    second = engine.sample(model, batch, sampling, generator_seed=4)
    assert engine.pushes == 2 and engine.served_model == f"{SERVED_NAME}-lora-2"
    assert not (engine.work_dir / "adapter-1").exists() and (engine.work_dir / "adapter-2").is_dir()
    assert _max_logp_error(model, processor, batch, second) <= LOGP_ATOL
    engine.sample(model, batch, sampling, generator_seed=5)  # nothing changed since: no push
    assert engine.pushes == 2
    # The step moved the log-probs far beyond the tolerance: an engine still on the old adapter would fail.
    after = {name: p.detach().clone() for name, p in adapter.items()}
    with torch.no_grad():
        for name, p in adapter.items():
            p.copy_(before[name])
        stale = _max_logp_error(model, processor, batch, second)
        for name, p in adapter.items():
            p.copy_(after[name])
    assert stale > 20 * LOGP_ATOL, stale


@pytest.mark.vllm
@pytest.mark.slow
def test_training_with_lora_and_the_vllm_engine(tmp_path, vllm_python):
    """Two steps of `vopd train` with rollout.engine=vllm and lora.r>0: adapter-only pushes, aligned."""
    from vopd.trainer import train

    args = ",".join(f"'{a}'" for a in CPU_SERVER_ARGS)
    cfg = load_config(
        None,
        [
            "model.path=toy-base",
            "data.train=toyworld:8:0",
            "rollout.n=2",
            "rollout.max_new_tokens=6",
            "prompts_per_step=2",
            "micro_batch_prompts=2",
            "max_steps=2",
            "report_to=[jsonl]",
            "threads=1",
            "health.every=0",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
            "lora.r=8",
            "teacher.kind=ema",
            "loss.rollout_correction=true",
            "rollout.engine=vllm",
            f"rollout.vllm_python={vllm_python}",
            f"rollout.vllm_args=[{args}]",
            "rollout.vllm_start_timeout=900",  # a loaded 2-core machine can take minutes
            f"output_dir={tmp_path}",
        ],
    )
    result = train(cfg)
    hist = result.history
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(h["divergence"])) for h in hist)
    assert hist[0]["time_weight_sync"] == 0.0 and hist[1]["time_weight_sync"] > 0  # step 2 pushed the adapter
    # Engine and trainer agree after the adapter moved: the correction weight min(pi_trainer / pi_engine, clip) ~1.
    assert all(abs(h["rollout_weight"] - 1.0) < 1e-2 for h in hist), [h["rollout_weight"] for h in hist]
    work = tmp_path / "vllm"
    assert sorted(p.name for p in work.glob("adapter-*")) == ["adapter-2"]
    served = json.loads((work / "adapter-2" / "adapter_config.json").read_text())
    assert served["r"] == 8
    assert not any("lora_" in k for k in load_file(work / "policy" / "model.safetensors"))  # the server's base
    assert (result.checkpoint / "adapter_model.safetensors").is_file()


@pytest.mark.vllm
@pytest.mark.slow
def test_ddp_two_processes_with_lora_and_a_server_the_user_started(tmp_path, vllm_python):
    """parallel.strategy=ddp at 2 gloo processes, a LoRA server started by the user on the base
    (rollout.vllm_url): rank 0 writes and loads each adapter, both ranks name the new one (a rank still
    naming the unloaded adapter gets a 404 from vLLM) and match the trainer on both ranks' tokens."""
    import os
    import subprocess
    import sys

    from vopd.rollout_vllm import _free_port, server_command, server_env
    from vopd.stock_processor import make_processor_stock
    from vopd.toyworld.model import toy_base_path

    base = tmp_path / "base"  # the base as a user serves it (stock processor class)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, processor = load_model(str(toy_base_path()))
    model.save_pretrained(base, safe_serialization=True)
    processor.save_pretrained(base)
    make_processor_stock(base)
    cmd = server_command(
        vllm_python, base, _free_port(), tmp_path / "t.jinja", extra=[*lora_server_args(8), *CPU_SERVER_ARGS]
    )
    env = dict(server_env(), VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    with user_server(cmd, env, tmp_path / "server.log") as url:
        run = tmp_path / "run"
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
            "optim.lr=5e-2",  # step 1 moves the adapter far: a rank sampling without it is off by > 1e-2
            "optim.warmup_steps=0",
            "loss.rollout_correction=true",
            "device=cpu",
            "parallel.strategy=ddp",
            "lora.r=8",
            "rollout.engine=vllm",
            f"rollout.vllm_url={url}",
            f"output_dir={run}",
        ]
        torchrun = Path(sys.executable).with_name("torchrun")
        train_env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "vopd.cli", "train", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=train_env, timeout=1500)
        assert proc.returncode == 0, proc.stderr[-4000:]
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    hist = [h for h in hist if "divergence" in h]
    assert len(hist) == 2 and hist[1]["time_weight_sync"] > 0
    assert all(abs(h["rollout_weight"] - 1.0) < 1e-2 for h in hist), [h["rollout_weight"] for h in hist]
    assert sorted(p.name for p in (run / "vllm").glob("adapter-*")) == ["adapter-2"]
