"""Fault injection on training runs: run folders, divergence, broken checkpoints, crashes mid-run.

Each test breaks something on purpose (a truncated file, a NaN weight, a changed seed, an error
mid-run) and checks that the run refuses, falls back or saves with a clear message naming the
file or key, and that nothing good is lost.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vopd.toyworld  # noqa: F401  registers the toyworld:N data spec
import vopd.trainer as trainer_mod
from vopd.checkpoint import (
    CheckpointError,
    check_checkpoint,
    checkpoint_dirs,
    latest_checkpoint,
    load_resume_point,
    load_trainer_state,
    save_checkpoint,
)
from vopd.config import load_config
from vopd.runfolder import RunFolderError, check_resume_config, check_world_size, truncate_metrics
from vopd.trainer import TrainingError, train

BASE = [
    "model.path=tiny:qwen2_vl",
    "data.train=toyworld:8:0",
    "rollout.n=2",
    "rollout.max_new_tokens=4",
    "loss.top_k=16",
    "optim.lr=1e-3",
    "optim.warmup_steps=0",
    "optim.weight_decay=0.0",
    "prompts_per_step=2",
    "micro_batch_prompts=2",
    "report_to=[jsonl]",
    "threads=1",
]


def _cfg(out: Path, *extra: str):
    return load_config(None, [*BASE, f"output_dir={out}", *extra])


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoint-1 and checkpoint-2 (copy before changing it)."""
    out = tmp_path_factory.mktemp("run2")
    train(_cfg(out, "max_steps=2", "save_every=1"))
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ------------------------------------------------------------------------------ run folders --


def test_new_run_into_a_used_folder_is_refused_then_overwrite_replaces_it(two_checkpoints, tmp_path, capsys):
    out = _copy(two_checkpoints, tmp_path)
    with pytest.raises(
        RunFolderError,
        match=r"already holds a run \(checkpoint-1, checkpoint-2, metrics.jsonl\).*--resume.*--overwrite",
    ):
        train(_cfg(out, "max_steps=1"))
    assert sorted(p.name for p in checkpoint_dirs(out)) == ["checkpoint-1", "checkpoint-2"]  # nothing pruned
    res = train(_cfg(out, "max_steps=1"), overwrite=True)
    assert "removed the earlier run" in capsys.readouterr().out
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-1"] and res.checkpoint.is_dir()
    assert _steps(out) == [1]  # not 1, 2 followed by 1
    with pytest.raises(RunFolderError, match="contradict"):
        train(_cfg(out, "max_steps=1"), resume=True, overwrite=True)


def test_resume_refuses_changed_training_keys_and_names_them(two_checkpoints, tmp_path):
    out = _copy(two_checkpoints, tmp_path)
    with pytest.raises(
        RunFolderError, match=r"data.train: 'toyworld:8:0' -> 'toyworld:8:1'.*prompts_per_step: 2 -> 4.*seed: 0 -> 3"
    ):
        train(_cfg(out, "max_steps=3", "seed=3", "data.train=toyworld:8:1", "prompts_per_step=4"), resume=True)
    with pytest.raises(RunFolderError, match=r"teacher.kind: 'ema' -> 'frozen'"):
        train(_cfg(out, "max_steps=3", "teacher.kind=frozen"), resume=True)


def test_resume_warns_on_harmless_keys_and_truncates_metrics(two_checkpoints, tmp_path, capsys):
    out = _copy(two_checkpoints, tmp_path)
    shutil.rmtree(out / "checkpoint-2")  # a kill after step 2 was logged but before it was saved
    assert _steps(out) == [1, 2]
    res = train(_cfg(out, "max_steps=3", "save_every=3", "log_every=1", "optim.lr=5e-4"), resume=True)
    printed = capsys.readouterr().out
    assert "resume: max_steps: 2 -> 3 (allowed)" in printed and "optim.lr: 0.001 -> 0.0005 (allowed)" in printed
    assert res.steps == 3 and _steps(out) == [1, 2, 3]  # step 2 logged once, not twice


def test_resume_on_another_world_size_is_refused(two_checkpoints, tmp_path):
    out = _copy(two_checkpoints, tmp_path)
    state_file = out / "checkpoint-2" / "trainer_state" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(RunFolderError, match="saved by 2 process.*this run has 1"):
        train(_cfg(out, "max_steps=3"), resume=True)
    check_world_size(1, 1, checkpoint="x")  # same size: fine
    check_world_size(None, 4, checkpoint="x")  # older checkpoint without the record: nothing to compare


def test_check_resume_config_unit():
    saved = {"seed": 0, "max_steps": 5, "optim": {"lr": 1e-3, "betas": [0.9, 0.999]}, "health": {"every": 0}}
    now = {"seed": 0, "max_steps": 9, "optim": {"lr": 1e-3, "betas": (0.9, 0.95)}, "health": {"every": 5}}
    with pytest.raises(RunFolderError, match=r"optim.betas: \[0.9, 0.999\] -> \[0.9, 0.95\]") as err:
        check_resume_config(saved, now, checkpoint="ck", say=lambda _: None)
    assert "max_steps" not in str(err.value)
    said: list[str] = []
    now["optim"]["betas"] = [0.9, 0.999]
    assert check_resume_config(saved, now, checkpoint="ck", say=said.append) == [
        "health.every: 0 -> 5",
        "max_steps: 5 -> 9",
    ]
    assert len(said) == 2


def test_truncate_metrics_drops_later_and_cut_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert truncate_metrics(tmp_path, 2) == 2
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert truncate_metrics(tmp_path / "none", 2) == 0


# ------------------------------------------------------------------------------ checkpoints --

BREAKS = {
    "truncated model": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    "model header cut": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:5])),
    "missing teacher": ("trainer_state/teacher.safetensors", lambda p: p.unlink()),
    "truncated teacher": ("trainer_state/teacher.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-100])),
    "truncated optimiser": ("trainer_state/optim_rng.pt", lambda p: p.write_bytes(p.read_bytes()[:-10])),
    "garbled state.json": ("trainer_state/state.json", lambda p: p.write_text('{"step": 2, "fil')),
    "missing processor file": ("processor_config.json", lambda p: p.unlink()),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_broken_newest_checkpoint_is_named_and_resume_falls_back(two_checkpoints, tmp_path, case, capsys):
    out = _copy(two_checkpoints, tmp_path)
    rel, breaker = BREAKS[case]
    broken = out / "checkpoint-2" / rel
    breaker(broken)
    with pytest.raises(CheckpointError, match=str(broken).replace(".", r"\.")):
        check_checkpoint(out / "checkpoint-2")
    said: list[str] = []
    ckpt, state = load_resume_point(out, say=said.append)
    assert ckpt == out / "checkpoint-1" and state["step"] == 1
    assert str(broken) in said[0] and "falling back to" in said[1]


def test_optimiser_file_garbled_in_place_is_a_checkpoint_error(two_checkpoints, tmp_path):
    """Same size (the file list passes) but the zip directory is garbage: torch.load fails, named."""
    out = _copy(two_checkpoints, tmp_path)
    f = out / "checkpoint-2" / "trainer_state" / "optim_rng.pt"
    data = bytearray(f.read_bytes())
    data[-200:] = b"\0" * 200
    f.write_bytes(bytes(data))
    check_checkpoint(out / "checkpoint-2")  # structure looks fine
    with pytest.raises(CheckpointError, match="optim_rng.pt: cannot be loaded"):
        load_trainer_state(out / "checkpoint-2")
    assert load_resume_point(out, say=lambda _: None)[0] == out / "checkpoint-1"


@pytest.mark.slow
def test_resume_after_a_truncated_checkpoint_reproduces_it_exactly(two_checkpoints, tmp_path, capsys):
    out = _copy(two_checkpoints, tmp_path)
    # clone: load_file maps the file, and truncating a mapped file kills the process (SIGBUS)
    want = {k: v.clone() for k, v in load_file(out / "checkpoint-2" / "model.safetensors").items()}
    model_file = out / "checkpoint-2" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    res = train(_cfg(out, "max_steps=2", "save_every=1"), resume=True)
    printed = capsys.readouterr().out
    assert f"skipping broken checkpoint: {model_file}" in printed and "resumed from" in printed
    got = load_file(res.checkpoint / "model.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=key)
    assert _steps(out) == [1, 2]


def test_every_checkpoint_broken_is_a_clear_error(two_checkpoints, tmp_path):
    out = _copy(two_checkpoints, tmp_path)
    for ck in ("checkpoint-1", "checkpoint-2"):
        (out / ck / "trainer_state" / "optim_rng.pt").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint.*optim_rng.pt: missing"):
        train(_cfg(out, "max_steps=3"), resume=True)


def test_save_fsyncs_everything_before_the_commit_rename(tmp_path, monkeypatch, tiny_qwen2_vl):
    model, processor = tiny_qwen2_vl
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    events: list[str] = []
    real_fsync, real_rename = os.fsync, Path.rename
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}"), real_fsync(fd))[1]
    )
    monkeypatch.setattr(Path, "rename", lambda self, t: (events.append(f"rename {self.name}"), real_rename(self, t))[1])
    final = save_checkpoint(
        tmp_path, 3, model=model, processor=processor, teacher_state={}, optimizer=opt, scheduler=sched, extra={}
    )
    commit = events.index(f"rename .checkpoint-3.tmp-{os.getpid()}")
    synced = {e.split(" ", 1)[1] for e in events[:commit]}
    files = {str(p).replace(final.name, f".checkpoint-3.tmp-{os.getpid()}") for p in final.rglob("*")}
    assert files <= synced  # every file and sub-folder, before the commit
    assert f"fsync {tmp_path}" in events[commit:]  # the rename itself is made durable
    check_checkpoint(final)


def test_stale_temporary_folders_are_cleaned_at_the_next_start(tmp_path, capsys):
    stale = tmp_path / ".checkpoint-7.tmp-999999999"  # no such process
    (stale / "trainer_state").mkdir(parents=True)
    train(_cfg(tmp_path, "max_steps=1"))
    assert not stale.exists() and "left by a save that crashed" in capsys.readouterr().out


def test_save_refuses_non_finite_weights(tmp_path, tiny_models):
    import copy

    model = copy.deepcopy(tiny_models("qwen2_vl")[0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param[0] = float("nan")
    with pytest.raises(CheckpointError, match=f"refusing to write checkpoint-1: model tensor '{name}'"):
        save_checkpoint(
            tmp_path, 1, model=model, processor=None, teacher_state={}, optimizer=opt, scheduler=sched, extra={}
        )
    assert not any(tmp_path.iterdir())  # nothing written, not even a temporary folder
    with pytest.raises(CheckpointError, match="teacher tensor 'w'"):
        save_checkpoint(
            tmp_path,
            1,
            model=torch.nn.Linear(2, 2),
            processor=None,
            optimizer=opt,
            scheduler=sched,
            teacher_state={"w": torch.tensor([1.0, float("inf")])},
            extra={},
        )


# ------------------------------------------------------------------------------- divergence --


def test_non_finite_parameters_after_the_update_stop_before_saving(tmp_path, monkeypatch):
    """The update itself writes a NaN (as lr=inf does): the run stops naming checkpoint-1."""
    real_setup = trainer_mod.setup

    def poisoned_setup(*args, **kwargs):
        run = real_setup(*args, **kwargs)
        state = run.state
        real_step = state.optimizer.step

        def step(*a, **k):
            out = real_step(*a, **k)
            if state.step == 1:  # the update of step 2
                with torch.no_grad():
                    next(state.policy.parameters()).view(-1)[0] = float("inf")
            return out

        state.optimizer.step = step
        return run

    monkeypatch.setattr(trainer_mod, "setup", poisoned_setup)
    with pytest.raises(
        TrainingError, match=r"step 2: the parameters became non-finite.*Last good checkpoint: .*checkpoint-1"
    ):
        train(_cfg(tmp_path, "max_steps=3", "save_every=1"))
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-1"]
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "checkpoint-1" / "model.safetensors").values())


def test_exploding_update_stops_the_run_without_a_checkpoint(tmp_path):
    """optim.lr=1e6: the first update multiplies the weights' norm; nothing wrecked is saved."""
    with pytest.raises(
        TrainingError, match=r"step 1: the parameter norm exploded.*last good checkpoint: none.*--overwrite"
    ):
        train(_cfg(tmp_path, "max_steps=3", "save_every=1", "optim.lr=1e6", "optim.grad_clip=0"))
    assert latest_checkpoint(tmp_path) is None


# ------------------------------------------------------------------------- crashes mid-run --


def test_an_error_mid_run_saves_the_finished_steps_first(tmp_path, capsys):
    def crash(state):
        if state.step == 2:
            raise OSError("disk went away (injected)")
        return {}

    with pytest.raises(OSError, match="injected"):
        train(_cfg(tmp_path, "max_steps=4", "save_every=0"), callbacks=[crash])
    assert "saved" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    res = train(_cfg(tmp_path, "max_steps=4", "save_every=0"), resume=True)
    assert res.steps == 4


def test_a_full_disk_during_save_leaves_no_half_checkpoint(two_checkpoints, tmp_path, monkeypatch):
    """ENOSPC while writing the teacher: a clear error, no temporary folder, older checkpoints intact."""
    import errno

    import vopd.checkpoint as ckpt_mod

    out = _copy(two_checkpoints, tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with pytest.raises(CheckpointError, match="could not write checkpoint-3 .*No space left.*untouched"):
        train(_cfg(out, "max_steps=3", "save_every=1"), resume=True)
    assert [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")] == []
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-1", "checkpoint-2"]
    check_checkpoint(out / "checkpoint-2")


def test_a_second_live_run_into_the_same_folder_is_refused(tmp_path):
    """Launched twice (or retried while the first still runs): the second run stops at once."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from vopd.runfolder import lock_run_folder; "
            "lock_run_folder(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"in use by another running vopd train \(pid {holder.pid}\)"):
            train(_cfg(tmp_path, "max_steps=1"))
    finally:
        holder.kill()
        holder.wait()
    res = train(_cfg(tmp_path, "max_steps=1"))  # the lock dies with its process
    assert res.steps == 1


def test_a_finished_run_releases_its_folder(tmp_path):
    import fcntl

    train(_cfg(tmp_path, "max_steps=1"))
    fd = os.open(tmp_path / ".vopd-train.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise BlockingIOError if still held
    finally:
        os.close(fd)


# ------------------------------------------ pruning: verified first, broken ones moved aside --


def _truncate_model(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])


def test_pruning_keeps_the_intact_checkpoint_not_a_newer_broken_one(two_checkpoints, tmp_path, capsys):
    """checkpoint-1 intact, checkpoint-3 truncated: resuming to step 2 with keep_checkpoints=1 used to
    delete checkpoint-1 and the checkpoint-2 just written, leaving only the broken one."""
    out = _copy(two_checkpoints, tmp_path)
    (out / "checkpoint-2").rename(out / "checkpoint-3")
    _truncate_model(out / "checkpoint-3")
    res = train(_cfg(out, "max_steps=2", "save_every=1", "keep_checkpoints=1"), resume=True)
    printed = capsys.readouterr().out
    assert res.checkpoint == out / "checkpoint-2"
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-2"]
    check_checkpoint(out / "checkpoint-2")
    assert (out / "broken-checkpoint-3" / "model.safetensors").is_file()  # moved aside, not deleted
    assert "moved the broken checkpoint-3 aside" in printed
    assert load_resume_point(out, say=lambda _: None)[0] == out / "checkpoint-2"


def test_two_broken_newer_checkpoints_do_not_push_the_good_ones_out(two_checkpoints, tmp_path, capsys):
    """Default keep_checkpoints=2 with truncated checkpoint-5 and -6: the intact ones are the ones kept."""
    out = _copy(two_checkpoints, tmp_path)
    for n in (5, 6):
        shutil.copytree(out / "checkpoint-2", out / f"checkpoint-{n}")
        _truncate_model(out / f"checkpoint-{n}")
    res = train(_cfg(out, "max_steps=3", "save_every=1"), resume=True)
    assert res.steps == 3
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-2", "checkpoint-3"]
    for ck in checkpoint_dirs(out):
        check_checkpoint(ck)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("broken-")) == [
        "broken-checkpoint-5",
        "broken-checkpoint-6",
    ]
    with pytest.raises(RunFolderError, match="broken-checkpoint-5"):  # a new run sees them as part of the run
        train(_cfg(out, "max_steps=1"))


def test_prune_unit_never_deletes_intact_while_broken_stays(two_checkpoints, tmp_path):
    from vopd.checkpoint import prune_checkpoints

    out = _copy(two_checkpoints, tmp_path)
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    _truncate_model(out / "checkpoint-3")
    (out / "broken-checkpoint-3").mkdir()  # an earlier one moved aside: the new one gets its own name
    said: list[str] = []
    removed = prune_checkpoints(out, 1, say=said.append)
    assert removed == [out / "checkpoint-1"]
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-2"]
    assert (out / "broken-checkpoint-3.1" / "model.safetensors").is_file()
    assert "broken-checkpoint-3.1" in said[0] and "model.safetensors" in said[0]


def test_a_checkpoint_whose_name_disagrees_with_its_step_is_named(two_checkpoints, tmp_path):
    """checkpoint-1 copied in as checkpoint-5: the resume says it continues at step 1, and why."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(two_checkpoints / "checkpoint-1", out / "checkpoint-5")
    said: list[str] = []
    ckpt, state = load_resume_point(out, say=said.append)
    assert ckpt == out / "checkpoint-5" and state["step"] == 1
    assert any("checkpoint-5 records step 1, not 5" in line for line in said)


def test_a_full_disk_inside_torch_save_names_the_disk_and_the_bytes(two_checkpoints, tmp_path, monkeypatch):
    """torch.save reports ENOSPC as 'RuntimeError: [enforce fail at inline_container.cc:672]': that
    used to escape as is, leaving the .tmp folder behind and the cause unnamed."""
    import vopd.checkpoint as ckpt_mod

    out = _copy(two_checkpoints, tmp_path)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ckpt_mod.torch, "save", full)
    with pytest.raises(
        CheckpointError,
        match=r"could not write checkpoint-3 .*the disk at /\S* has .* free, "
        r"a checkpoint needs about .* \(\d+ bytes\).*temporary folder was removed",
    ):
        train(_cfg(out, "max_steps=3", "save_every=1"), resume=True)
    assert [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")] == []
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-1", "checkpoint-2"]


_FAKE_MINUTES_PER_STEP = 10.0
# A default run whose wall clock advances _FAKE_MINUTES_PER_STEP per finished step (vopd.trainer._clock):
# the test needs minutes between checkpoints without waiting for them.
_KILLABLE_RUN = f"""
import sys
import vopd.toyworld
import vopd.trainer as trainer
from vopd.config import load_config

done = [0]
trainer._clock = lambda: 60.0 * {_FAKE_MINUTES_PER_STEP} * done[0]
trainer.train(load_config(None, sys.argv[1:]), callbacks=[lambda state: done.__setitem__(0, state.step)])
"""


def _finished_steps(out: Path) -> list[int]:
    """The steps of metrics.jsonl's complete lines (a line being written, or cut by the kill, is not one)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []
    return [json.loads(line)["step"] for line in lines]


def test_a_default_run_killed_at_a_random_step_resumes_from_a_recent_checkpoint(tmp_path):
    """kill -9 (no Python handler runs: the OOM killer, a preempted node) at a random step of a run with
    the default save settings: the newest intact checkpoint is at most `save_minutes` older than the
    last finished step, and --resume continues from it."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from vopd.config import TrainConfig

    default_minutes = TrainConfig().save_minutes
    assert default_minutes > 0 and TrainConfig().save_every == 0  # the default saves by wall time
    interval_steps = int(default_minutes // _FAKE_MINUTES_PER_STEP)
    seed = random.randrange(10**6)
    # After the first interval, so there is a checkpoint to resume (before it a killed run restarts from
    # step 0 and loses less than the interval by definition).
    kill_at = random.Random(seed).randrange(interval_steps + 1, 2 * interval_steps + 1)
    out = tmp_path / "run"
    argv = [*BASE, f"output_dir={out}", f"max_steps={2 * interval_steps + 2}"]
    run = subprocess.Popen([sys.executable, "-c", _KILLABLE_RUN, *argv], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while run.poll() is None and time.monotonic() < deadline:
            if len(_finished_steps(out)) >= kill_at:
                break
            time.sleep(0.02)
        assert run.poll() is None, f"the run ended (rc {run.returncode}) before step {kill_at} (seed {seed})"
        os.kill(run.pid, signal.SIGKILL)
    finally:
        run.kill()
        run.wait()
    last_step = _finished_steps(out)[-1]  # the kill lands at or after step kill_at
    ckpt = latest_checkpoint(out)
    assert ckpt is not None, f"killed at step {last_step} (seed {seed}): no checkpoint"
    saved = int(ckpt.name.split("-")[-1])
    lost_minutes = (last_step - saved) * _FAKE_MINUTES_PER_STEP
    assert 0 <= lost_minutes <= default_minutes, (last_step, saved, seed)
    check_checkpoint(ckpt)
    res = train(_cfg(out, f"max_steps={saved + 1}"), resume=True)
    assert res.steps == saved + 1 and [h["step"] for h in res.history] == [saved + 1]


def test_checkpoint_and_export_weights_are_readable_as_the_umask_allows(tmp_path, tiny_qwen2_vl):
    """The safetensors writer makes 0600 files; under umask 022 the weights are 0644 like the config."""
    import stat

    from vopd.sharded_checkpoint import export_checkpoint

    model, processor = tiny_qwen2_vl
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    old = os.umask(0o022)
    try:
        final = save_checkpoint(
            tmp_path / "run",
            1,
            model=model,
            processor=processor,
            teacher_state={k: v for k, v in list(model.state_dict().items())[:2]},
            optimizer=opt,
            scheduler=sched,
            extra={},
        )
        check_checkpoint(final)
        exported = export_checkpoint(final, tmp_path / "hf")
    finally:
        os.umask(old)
    weights = sorted(final.rglob("*.safetensors")) + sorted(exported.rglob("*.safetensors"))
    assert len(weights) >= 3  # model + teacher, and the export's model
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in weights} == {oct(0o644)}
