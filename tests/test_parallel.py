"""FSDP2 (`parallel.strategy=fsdp2`) on CPU with 2 gloo processes under torchrun: the same weights
and teacher as one unsharded process, resume across steps and world sizes, the sharded EMA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vopd.toyworld  # noqa: F401  registers the toyworld:N data spec used below
from vopd.config import load_config
from vopd.knobs import ConfigError
from vopd.runfolder import RunFolderError
from vopd.sharded_checkpoint import HF_NAMES, SHARD_DIR, assemble, shard_index
from vopd.trainer import train

# Float comparisons between code paths: CI runs this file under a second kernel set too (.ci/run).
pytestmark = pytest.mark.numerics

# Greedy rollouts make every run score the same responses; lr 1e-3 moves the weights visibly.
ARGS = [
    "model.path=tiny:qwen2_vl",
    "data.train=toyworld:16:0",
    "rollout.n=2",
    "rollout.max_new_tokens=4",
    "loss.top_k=16",
    "loss.chunk_size=7",
    "optim.lr=1e-3",
    "optim.weight_decay=0.0",
    "optim.warmup_steps=0",
    "prompts_per_step=4",
    "micro_batch_prompts=1",
    "report_to=[jsonl]",
    "threads=1",
    "rollout.temperature=0",
    "teacher.kind=ema",
    "teacher.ema_rate=0.5",
    "device=cpu",
    "save_every=1",
    "keep_checkpoints=0",
]
FSDP2 = "parallel.strategy=fsdp2"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def _run(nproc: int, *args: str, resume: bool = False) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "-m", "vopd.cli", "train", *ARGS, *args]
    proc = subprocess.run(cmd + (["--resume"] if resume else []), capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _load(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Student and teacher weights of a checkpoint, gathered (hf) or sharded (dcp) alike."""
    shards = ckpt / "trainer_state" / SHARD_DIR
    if not shards.is_dir():
        return load_file(ckpt / "model.safetensors"), load_file(ckpt / "trainer_state" / "teacher.safetensors")
    model, teacher = ({k[len(p) :]: assemble(k, c) for k, c in shard_index(shards, p).items()} for p in _PARTS)
    names = json.loads((ckpt / "trainer_state" / HF_NAMES).read_text())  # module names -> saved (HF) names
    return {names[k]: v for k, v in model.items()}, teacher


_PARTS = ("model.", "teacher.")


def _assert_same(a: Path, b: Path) -> None:
    (ma, ta), (mb, tb) = _load(a), _load(b)
    assert ma.keys() == mb.keys() and ta.keys() == tb.keys()
    for key in ma:
        # 2 processes vs 1: the gradient all-reduce and the per-rank token sums add in another order, which
        # perturbs each gradient by ~sqrt(n) * 2**-24 relative; AdamW divides by sqrt(v), so the update moves
        # by as little where gradients are not near zero. 1e-5 absolute (weights move by ~1e-3 a step) holds
        # under the AVX2 and the portable kernels (CI runs both).
        torch.testing.assert_close(ma[key], mb[key], atol=1e-5, rtol=0, msg=key)
    for key in ta:  # the sharded EMA teacher equals the unsharded one
        torch.testing.assert_close(ta[key], tb[key], atol=1e-5, rtol=0, msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Two steps in one ordinary (unsharded) process."""
    out = tmp_path_factory.mktemp("ref")
    train(load_config(None, [*ARGS, "max_steps=2", f"output_dir={out}"]))
    return out


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process(tmp_path, reference):
    """Sharded checkpoints (the fsdp2 default): every rank wrote its own shard file; the final
    checkpoint's exported HF weights equal the shards and the 1-process run."""
    _run(2, FSDP2, "max_steps=2", f"output_dir={tmp_path}")
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state" / "state.json").read_text())
    assert state["world_size"] == 2 and state["config"]["parallel"]["strategy"] == "fsdp2"
    assert state["format"] == "dcp"
    shard_files = sorted((tmp_path / "checkpoint-2" / "trainer_state" / SHARD_DIR).glob("*.safetensors"))
    assert len(shard_files) == 2 and all(f"trainer_state/{SHARD_DIR}/{f.name}" in state["files"] for f in shard_files)
    assert not (tmp_path / "checkpoint-1" / "model.safetensors").exists()  # only the last one is exported
    exported = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    sharded, _ = _load(tmp_path / "checkpoint-2")
    assert exported.keys() == sharded.keys() and all(torch.equal(exported[k], sharded[k]) for k in sharded)
    torch.testing.assert_close(exported, _load(reference / "checkpoint-2")[0], atol=1e-5, rtol=0)
    m1, t1 = _load(reference / "checkpoint-1")
    m2, t2 = _load(reference / "checkpoint-2")
    assert max(float((m2[k] - m1[k]).abs().max()) for k in m2) > 1e-4, "step 2 did not move the weights"
    assert max(float((t2[k] - t1[k]).abs().max()) for k in t2) > 1e-4, "the EMA teacher did not move"
    _assert_same(tmp_path / "checkpoint-2", reference / "checkpoint-2")


@pytest.mark.slow
def test_fsdp2_resume_one_plus_one_equals_two_at_any_world_size(tmp_path, reference):
    _run(2, FSDP2, "max_steps=1", f"output_dir={tmp_path / 'two'}")
    _run(2, FSDP2, "max_steps=2", f"output_dir={tmp_path / 'two'}", resume=True)
    _assert_same(tmp_path / "two" / "checkpoint-2", reference / "checkpoint-2")
    # The same 2-process checkpoint resumed by one process: every rank reads the full state.
    one = tmp_path / "one"
    one.mkdir()
    (tmp_path / "two" / "checkpoint-1").rename(one / "checkpoint-1")
    res = train(load_config(None, [*ARGS, FSDP2, "max_steps=2", f"output_dir={one}"]), resume=True)
    assert res.steps == 2
    _assert_same(one / "checkpoint-2", reference / "checkpoint-2")


@pytest.mark.slow
def test_fsdp2_gathered_checkpoints_resume_at_another_world_size(tmp_path, reference):
    """checkpoint.format=hf: the student, teacher and optimiser gathered to rank 0 (a plain HF folder
    at every save), resumed by one process."""
    _run(2, FSDP2, "checkpoint.format=hf", "max_steps=1", f"output_dir={tmp_path}")
    assert (tmp_path / "checkpoint-1" / "trainer_state" / "teacher.safetensors").is_file()
    res = train(
        load_config(None, [*ARGS, FSDP2, "checkpoint.format=dcp", "max_steps=2", f"output_dir={tmp_path}"]),
        resume=True,
    )
    assert res.steps == 2
    _assert_same(tmp_path / "checkpoint-2", reference / "checkpoint-2")


@pytest.mark.slow
def test_fsdp2_loads_each_rank_s_shards_from_a_folder(tmp_path, reference):
    """model.path a folder: every rank builds the model on the meta device and reads its own slices
    (vopd.parallel.WeightFiles); 2 steps equal the 1-process run of the same weights (tiny:qwen2_vl
    at seed 0 is the folder's model)."""
    from vopd.tiny_models import build_tiny_model

    model, processor = build_tiny_model("qwen2_vl", seed=0)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    _run(2, FSDP2, "max_steps=2", f"model.path={tmp_path / 'model'}", f"output_dir={tmp_path / 'run'}")
    _assert_same(tmp_path / "run" / "checkpoint-2", reference / "checkpoint-2")


@pytest.mark.slow
def test_fsdp2_external_teacher_equals_one_process(tmp_path):
    """teacher.kind=external (another checkpoint, here a tiny model of another seed) sharded with
    the student's kind of plan: 2 processes give the 1-process (ddp) student after 2 steps."""
    from vopd.tiny_models import build_tiny_model

    model, processor = build_tiny_model("qwen2_vl", seed=7)
    model.save_pretrained(tmp_path / "teacher")
    processor.save_pretrained(tmp_path / "teacher")
    ext = ["teacher.kind=external", f"teacher.path={tmp_path / 'teacher'}", "max_steps=2"]
    train(load_config(None, [*ARGS, *ext, f"output_dir={tmp_path / 'one'}"]))
    _run(2, FSDP2, *ext, f"output_dir={tmp_path / 'two'}")
    one = load_file(tmp_path / "one" / "checkpoint-2" / "model.safetensors")
    two = _load(tmp_path / "two" / "checkpoint-2")[0]
    start = build_tiny_model("qwen2_vl", seed=0)[0].state_dict()["lm_head.weight"]  # the student's init
    assert float((one["lm_head.weight"] - start).abs().max()) > 1e-4, "the steps did not move the student"
    torch.testing.assert_close(two, one, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_fsdp2_trust_region_teacher_equals_one_process(tmp_path):
    """teacher.kind=trust_region: a sharded frozen reference mixed with the current (sharded) student;
    2 processes give the 1-process student and reference after 2 steps."""
    tr = ["teacher.kind=trust_region", "teacher.mix=0.5", "max_steps=2"]
    train(load_config(None, [*ARGS, *tr, f"output_dir={tmp_path / 'one'}"]))
    _run(2, FSDP2, *tr, f"output_dir={tmp_path / 'two'}")
    _assert_same(tmp_path / "two" / "checkpoint-2", tmp_path / "one" / "checkpoint-2")


@pytest.mark.slow
def test_fsdp2_health_probe_equals_one_process(tmp_path):
    """health.every=1 under fsdp2: every rank runs the probe with the roots gathered; the probe's
    numbers and the weights equal the 1-process run."""
    hp = ["health.every=1", "health.probe_size=2", "health.max_new_tokens=4", "max_steps=2"]
    train(load_config(None, [*ARGS, *hp, f"output_dir={tmp_path / 'one'}"]))
    _run(2, FSDP2, *hp, f"output_dir={tmp_path / 'two'}")
    _assert_same(tmp_path / "two" / "checkpoint-2", tmp_path / "one" / "checkpoint-2")

    def probes(run: Path) -> list[dict[str, float]]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k.startswith("health/")} for r in rows]

    one, two = probes(tmp_path / "one"), probes(tmp_path / "two")
    assert len(one) == len(two) and any("health/teacher_drift" in r for r in one)
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-5, (key, a[key], b[key])


@pytest.mark.slow
def test_fsdp2_proposed_crops_equal_one_process(tmp_path):
    """views.crop_source=attention under fsdp2: every rank proposes in step with the root gathered,
    rank 0 writes the cache; the proposals and the trained weights equal the 1-process run."""
    pc = ["views.crop_source=attention", "max_steps=2"]
    train(load_config(None, [*ARGS, *pc, f"output_dir={tmp_path / 'one'}"]))
    _run(2, FSDP2, *pc, f"output_dir={tmp_path / 'two'}")

    def boxes(run: Path) -> dict[str, list[float]]:
        rows = [json.loads(line) for line in (run / "proposals.jsonl").read_text().splitlines()]
        return {r["id"]: r["box"] for r in rows}

    assert boxes(tmp_path / "two") == boxes(tmp_path / "one") and len(boxes(tmp_path / "one")) == 16
    _assert_same(tmp_path / "two" / "checkpoint-2", tmp_path / "one" / "checkpoint-2")


def test_resume_with_another_strategy_is_refused(tmp_path):
    args = [*ARGS, "max_steps=1", "rollout.max_new_tokens=2", f"output_dir={tmp_path}"]
    train(load_config(None, args))
    with pytest.raises(RunFolderError, match="parallel.strategy: 'ddp' -> 'fsdp2'"):
        train(load_config(None, [*args, FSDP2, "max_steps=2"]), resume=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16"])  # fp32 EMA: covered by the trainer tests above
def test_sharded_ema_teacher_equals_unsharded_reference(tmp_path, dtype):
    """bf16 exercises the fp32 master shards (an in-place bf16 lerp would round the update away)."""
    worker = Path(__file__).parent / "workers" / "fsdp2_ema.py"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "ema.json"
    proc = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(worker), str(out), dtype],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["any_sharded"] and res["keys_equal"] and res["moved"] > 1e-3
    assert res["dtypes"] == ["torch.float32"]  # bf16 copies are saved at their master precision
    assert res["max_diff"] <= 1e-7


def test_fsdp2_config_refuses_what_it_does_not_support():
    with pytest.raises(ConfigError, match="parallel.strategy=.zero3. is not one of ddp . fsdp2"):
        load_config(None, ["parallel.strategy=zero3"])
    with pytest.raises(ConfigError, match="teacher.kind ema, frozen, trust_region or external, got live"):
        load_config(None, [FSDP2, "teacher.kind=live"])
