"""The GPU check: correctness on CUDA, throughput, memory against `memplan.py`, MFU, FSDP2 over NCCL.

Run through ``scripts/gpu_check.sh --out DIR`` (which installs carried wheels first); docs/scaling.md
("The GPU check") says what each number means. Every part runs in its own process with its own
timeout, under one time budget; ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` are rewritten after
each part, so what was measured survives a later failure, a timeout or a killed run.

Parts (in order): ``env`` (versions, the device), ``loss_cuda`` (the fused loss and its gradients
vs a float64 reference at V = 151,936, fp32 and bf16), ``train_step_device`` (one ``train_step`` on
CUDA vs CPU on the same rollouts), ``full_ft`` (Qwen3-VL-2B shape, full depth, bf16, EMA teacher,
gradient checkpointing, 8 rollouts x 512 tokens), ``lora`` (Qwen2.5-VL-7B shape, full depth, r=16,
teacher = adapters off), ``loss_scale`` (peak memory of the fused vs the one-piece loss at the
paper's 8 x 1024 response tokens, V = 151,936 and 248,320), ``fsdp2`` (``parallel.strategy=fsdp2``
under torchrun, 1 process, NCCL).

``--dry-run``: the same parts and code paths on CPU at shrunk shapes (gpu_models.shrink), fp32
where CPU needs it (a few minutes on 2 cores, most of it starting Python processes);
tests/test_gpu_check.py runs it in CI.

    python benchmarks/bench_gpu.py --out DIR [--dry-run] [--budget-s 420] [--parts a,b]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GIB = 2**30


@dataclass(frozen=True)
class Part:
    name: str
    what: str
    timeout_s: int  # on the GPU
    min_s: int  # not started with less time left than this (skipped for time)


PARTS = (
    Part("env", "versions, device, carried packages", 90, 15),
    Part("loss_cuda", "fused loss + gradients vs float64 at V=151,936 (fp32, bf16)", 90, 20),
    Part("train_step_device", "one train_step on CUDA vs CPU, same rollouts", 150, 40),
    Part("full_ft", "full fine-tuning, Qwen3-VL-2B shape, bf16, EMA teacher, checkpointing", 210, 90),
    Part("lora", "LoRA r=16, Qwen2.5-VL-7B shape, teacher = adapters off", 210, 90),
    Part("loss_scale", "fused vs one-piece loss memory, 8 x 1024 tokens, V=151,936 / 248,320", 120, 30),
    Part("fsdp2", "parallel.strategy=fsdp2 under torchrun, 1 process, NCCL", 120, 30),
)
#: Dry-run timeout per part (CPU, shrunk shapes): a safety net, generous for slow shared machines.
DRY_TIMEOUT_S = 400


# ----------------------------------------------------------------------------------------------
# Orchestration: one subprocess per part, results written after each.


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def orchestrate(out: Path, *, dry: bool, budget_s: float, parts: list[str], work: Path) -> dict[str, Any]:
    """Run ``parts`` in order within ``budget_s``; returns (and keeps writing) the report."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    report: dict[str, Any] = {
        "dry_run": dry,
        "started": _now(),
        "budget_s": budget_s,
        "device": None,
        "torch": None,
        "transformers": None,
        "parts": {p.name: {"status": "pending", "what": p.what} for p in PARTS if p.name in parts},
    }
    log = out / "gpu_check.log"
    log.write_text("")
    _write(out, report, start)
    env_ok = True
    for part in PARTS:
        if part.name not in parts:
            continue
        entry = report["parts"][part.name]
        left = budget_s - (time.monotonic() - start)
        if not env_ok:
            entry.update(status="skipped", reason="the env part failed: see its error")
        elif left < part.min_s:
            entry.update(status="skipped", reason=f"skipped for time: {left:.0f} s left, the part needs {part.min_s} s")
        else:
            timeout = min(DRY_TIMEOUT_S if dry else part.timeout_s, left)
            entry["status"] = "running"  # what a run killed from outside shows
            _write(out, report, start)
            entry.update(_run_part(part.name, dry=dry, timeout=timeout, work=work, log=log))
        if part.name == "env":
            env_ok = entry["status"] == "ok"
            for key in ("device", "torch", "transformers"):
                report[key] = entry.get(key)
        _write(out, report, start)
        print(
            f"[gpu_check] {part.name}: {entry['status']} {entry.get('error') or entry.get('reason') or ''}", flush=True
        )
    return report


def _run_part(name: str, *, dry: bool, timeout: float, work: Path, log: Path) -> dict[str, Any]:
    result = work / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", name, "--result", str(result), "--work", str(work)]
    cmd += ["--dry-run"] if dry else []
    t0 = time.monotonic()
    with log.open("a") as fh:
        fh.write(f"\n===== {name} ({_now()}, timeout {timeout:.0f} s)\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
    entry = json.loads(result.read_text()) if result.is_file() else {}
    entry["seconds"] = round(time.monotonic() - t0, 1)
    if rc is None:
        entry.update(status="failed", error=f"timed out after {timeout:.0f} s (what it measured before is kept)")
    elif rc != 0 and entry.get("status") != "failed":
        entry.update(status="failed", error=f"exit code {rc}: {_last_line(log)}")
    elif rc == 0 and entry.get("status") is None:
        entry.update(status="failed", error="the part wrote no status")
    return entry


def _kill_group(proc: subprocess.Popen) -> None:
    """End the part and every process it started (torchrun's workers): it runs in its own session."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _write(out: Path, report: dict[str, Any], start: float) -> None:
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out / "gpu_check.json")
    (out / "gpu_check.md").write_text(markdown(report))


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "GiB":
        return f"{value / GIB:.1f} GiB"
    if unit == "%":
        return f"{100 * value:.1f} %"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """The report as a page: one row per part, then each part's details."""
    lines = [
        "# vopd GPU check"
        + (" (dry run: CPU, shrunk shapes; no number here is a GPU measurement)" if report["dry_run"] else ""),
        "",
        f"Started {report['started']}; device {report['device']}; torch {report['torch']}; "
        f"transformers {report['transformers']}; {report['elapsed_s']} s of a {report['budget_s']:.0f} s budget.",
        "",
        "| part | status | step s | rollout tokens/s | peak memory | memplan | measured / memplan | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, p in report["parts"].items():
        ratio = (
            p["peak_memory_bytes"] / p["memplan_bytes"]
            if p.get("peak_memory_bytes") and p.get("memplan_bytes")
            else None
        )
        step = p.get("step_seconds", {}).get("step") if isinstance(p.get("step_seconds"), dict) else None
        status = p["status"] + (
            f": {p.get('error') or p.get('reason')}" if p["status"] != "ok" and p["status"] != "pending" else ""
        )
        lines.append(
            f"| {name} | {status} | {_fmt(step)} | {_fmt(p.get('rollout_tokens_per_s'))} | "
            f"{_fmt(p.get('peak_memory_bytes'), 'GiB')} | {_fmt(p.get('memplan_bytes'), 'GiB')} | "
            f"{_fmt(ratio)} | {_fmt(p.get('mfu'), '%')} |"
        )
    for name, p in report["parts"].items():
        details = {k: v for k, v in p.items() if k not in ("status", "what")}
        if details:
            lines += ["", f"## {name}: {p['what']}", "", "```json", json.dumps(details, indent=1)[:6000], "```"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Worker side: shared pieces.


class Result(dict):
    """A part's result, saved after every update so a timeout keeps what was measured."""

    def __init__(self, path: Path):
        super().__init__(status="running")
        self.path = path
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str))
        tmp.replace(self.path)

    def put(self, **values: Any) -> None:
        self.update(values)
        self.save()


def _device(dry: bool) -> str:
    return "cpu" if dry else "cuda"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_bytes(device: str) -> int:
    """Peak memory of this process so far: CUDA's max allocated, or on CPU the peak resident set."""
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def _allocated_bytes(device: str) -> int:
    """Memory held now: CUDA's allocated bytes, or on CPU the resident set."""
    import torch

    if device == "cuda":
        return int(torch.cuda.memory_allocated())
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def _memory_meter(device: str) -> str:
    return "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS (VmHWM), CPU"


def write_data(folder: Path, *, count: int, size: int) -> Path:
    """``count`` synthetic scenes of ``size`` px with one evidence box each, as a vopd JSONL file."""
    from common import QUESTION, scene

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        name = f"scene{i}.png"
        scene(i, size).save(folder / name)
        x0, y0 = (0.2 + 0.1 * (i % 4)) * size, 0.3 * size
        rows.append(
            {"id": f"s{i}", "image": name, "question": QUESTION, "boxes": [[x0, y0, x0 + size // 5, y0 + size // 5]]}
        )
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_config(overrides: list[str]):
    """A TrainConfig from ``key=value`` overrides on top of the check's common settings."""
    from vopd.config import load_config

    common = [
        "prompts_per_step=1",
        "micro_batch_prompts=1",
        "rollout.n=8",
        "optim.lr=1e-6",
        "optim.warmup_steps=0",
        "report_to=[jsonl]",
        "seed=0",
        "data.shuffle=false",
    ]
    return load_config(None, common + overrides)


class RecordingEngine:
    """Wraps the run's rollout engine and keeps the last rollouts (their lengths enter the FLOP count)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.last = None

    def sample(self, model: Any, prompt_batch: Any, cfg: Any, **kwargs: Any) -> Any:
        self.last = self.engine.sample(model, prompt_batch, cfg, **kwargs)
        return self.last

    def __getattr__(self, name: str) -> Any:  # step_metrics, close, ... of the wrapped engine
        return getattr(self.engine, name)


class ReplayEngine:
    """Returns fixed rollouts (the same tokens on every device), whatever the model would sample."""

    def __init__(self, rollouts: Any):
        self.rollouts = rollouts

    def sample(self, model: Any, prompt_batch: Any, cfg: Any, **kwargs: Any) -> Any:
        return self.rollouts

    def step_metrics(self) -> dict[str, float]:  # the rest of vopd.rollout.RolloutEngine: nothing to report
        return {}

    def close(self) -> None:
        pass


def build_run(cfg: Any):
    """The training state and an iterator over the step's micro-batches, as `vopd.trainer.train` makes them."""
    import torch

    from vopd.data import PairCollator
    from vopd.train_setup import setup

    state, sampler, dataset, _ = setup(cfg, overwrite=True)
    collate = PairCollator(state.processor, thinking=cfg.model.thinking, max_prompt_tokens=cfg.data.max_prompt_tokens)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    return state, iter(loader), sampler.micro_batches_per_step()


def model_size(policy: Any, summary: dict[str, Any]):
    """`gpu_flops.ModelSize` of the policy (adapters excluded), parameter counts read off its modules."""
    from gpu_flops import ModelSize

    layers = vision = 0
    for name, p in policy.named_parameters():
        if "lora_" in name:
            continue
        if ".visual." in f".{name}":
            vision += p.numel()
        elif "language_model.layers." in name:
            layers += p.numel()
    return ModelSize(
        layer_params=layers,
        vision_params=vision,
        layers=summary["layers"],
        attention_width=summary["attention_width"],
        hidden=summary["hidden"],
        vocab=summary["vocab"],
    )


def view_work(batch: Any, rollouts: Any, mode: str):
    """`gpu_flops.ViewWork` of the first prompt of a micro-batch (the check runs one prompt per step),
    scored in sharing ``mode``."""
    from gpu_flops import ViewWork

    mask = batch["attention_mask"][0]
    grid = batch.get("image_grid_thw")
    patches = int(grid.prod(-1).sum()) if grid is not None else 0
    return ViewWork(int(mask.sum()), patches, tuple(int(x) for x in rollouts.mask_B_T.sum(1)), mode)


def memplan_estimate(summary: dict[str, Any], *, strategy: str, teacher: str, tokens: int, lora_r: int = 0):
    """`memplan.py`'s per-GPU estimate for this shape: state (+ gathered units) + activations, bytes."""
    import memplan

    shape = memplan.ModelShape(
        summary["model_type"],
        summary["parameters"],
        summary["hidden"],
        summary["layers"],
        summary["vocab"],
        summary["tied"],
        intermediate=summary["intermediate"],
    )
    parts = memplan.state_bytes(shape, strategy=strategy, world=1, teacher=teacher, bf16=True, lora_r=lora_r)
    parts["activations (rough rule)"] = memplan.activation_bytes(shape, tokens=tokens)
    return int(sum(parts.values())), {k: int(v) for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------
# Parts.


def part_env(res: Result, dry: bool, work: Path) -> None:
    import platform
    from importlib.metadata import PackageNotFoundError, requires, version

    import torch
    import torch.distributed
    import transformers
    from packaging.requirements import Requirement
    from packaging.version import Version

    import vopd

    res.put(
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        cuda=torch.version.cuda,
        vopd_from=str(Path(vopd.__file__).parent),
        transformers_from=str(Path(transformers.__file__).parent),
        float32_matmul_precision=torch.get_float32_matmul_precision(),
    )
    versions = {}
    for name in ("accelerate", "peft", "huggingface-hub", "tokenizers", "safetensors", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    unmet = []
    for dist in ("transformers", "peft", "accelerate", "huggingface-hub"):
        for text in requires(dist) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = version(req.name)
            except PackageNotFoundError:
                unmet.append(f"{dist} needs {req} (missing)")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{dist} needs {req} (have {have})")
    res.put(versions=versions, unmet_requirements=unmet)
    import peft  # noqa: F401  (LoRA part)

    problems = []
    if Version(transformers.__version__.split("+")[0]) < Version("5.20"):
        problems.append(f"transformers {transformers.__version__} < 5.20: carry the wheels (scripts/gpu_check.sh)")
    if dry:
        res.put(device=f"cpu (dry run): {platform.processor() or platform.machine()}")
    elif not torch.cuda.is_available():
        problems.append("torch sees no CUDA device")
    else:
        props = torch.cuda.get_device_properties(0)
        res.put(
            device=torch.cuda.get_device_name(0),
            device_memory_bytes=int(props.total_memory),
            multiprocessors=props.multi_processor_count,
            bf16=torch.cuda.is_bf16_supported(),
            nccl=str(torch.cuda.nccl.version()) if torch.distributed.is_nccl_available() else None,
        )
    if problems:
        res.put(status="failed", error="; ".join(problems))
    else:
        res.put(status="ok")


def _loss_inputs(device: str, n: int, h: int, vocab: int, *, bf16: bool, seed: int = 0) -> dict[str, Any]:
    """Inputs of the loss as the trainer hands them over: the student's final hidden states (bf16 when
    the model runs in bf16) and its fp32 master head, the teacher's hidden states and head (a bf16 copy
    under mixed_precision=bf16). Logits have a standard deviation of ~3 (peaked, like a trained model's)
    and the teacher's hidden states differ from the student's by noise of 0.5."""
    import torch

    low = torch.bfloat16 if bf16 else torch.float32
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, device=device)
    weight = torch.randn(vocab, h, generator=g, device=device) * (3.0 / h**0.5)
    teacher_hidden = hidden + 0.5 * torch.randn(n, h, generator=g, device=device)
    return {
        "hidden": hidden.to(low),
        "weight": weight,
        "teacher_hidden": teacher_hidden.to(low),
        "teacher_weight": weight.to(low),
    }


def _fused_loss(x: dict[str, Any], *, one_piece: bool = False) -> tuple[Any, Any, Any]:
    """The trainer's call (`vopd.fused_loss.distillation_loss`) on fresh leaves of ``x``: the fused path
    (a linear head), or with ``one_piece`` the student's full logits first (``naive=true``'s way, under
    autocast as the model's forward is). Returns (loss, grad of the hidden states, grad of the head)."""
    import torch

    from vopd.config import LossConfig
    from vopd.fused_loss import TeacherLogits, distillation_loss
    from vopd.models import LinearHead
    from vopd.objectives import LossKnobs

    hidden = x["hidden"].detach().clone().requires_grad_(True)
    weight = x["weight"].detach().clone().requires_grad_(True)
    n = hidden.shape[0]
    teacher = TeacherLogits(x["teacher_hidden"], lambda t: torch.nn.functional.linear(t, x["teacher_weight"]))
    weights_N = torch.full((n,), 1.0 / n, device=hidden.device)
    if one_piece:
        bf16 = hidden.dtype == torch.bfloat16
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = torch.nn.functional.linear(hidden, weight)
        loss, _ = distillation_loss(logits, None, teacher, weights_N, knobs=LossKnobs.from_config(LossConfig()))
    else:
        loss, _ = distillation_loss(
            hidden, LinearHead(weight, None, None), teacher, weights_N, knobs=LossKnobs.from_config(LossConfig())
        )
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def part_loss_cuda(res: Result, dry: bool, work: Path) -> None:
    """The fused loss (`distillation_loss` with a linear head: the trainer's call) and its gradients
    against the same loss in float64 with full logits, at V = 151,936, in fp32 and as the trainer runs
    under mixed_precision=bf16. The reference starts from the same (bf16-rounded) inputs, so the
    errors measure the computation, not the rounding of the inputs."""

    from vopd.config import LossConfig
    from vopd.objectives import LossKnobs, per_token_divergence

    device = _device(dry)
    n, h, v = (32, 64, 151_936) if dry else (512, 2048, 151_936)
    # fp32: rounding (2^-24) summed over H and V terms stays far below 1e-4. bf16: the teacher's logits
    # come out of a bf16 product rounded to 8 significant bits (2^-9 relative), the student's hidden-state
    # gradient is stored in bf16; on CPU these inputs gave loss errors <= 0.4 % and gradient errors 1-2 %.
    tolerances = {"float32": {"loss": 1e-5, "grad": 1e-4}, "bfloat16": {"loss": 1e-2, "grad": 5e-2}}
    checks = []
    for precision, tol in tolerances.items():
        x = _loss_inputs(device, n, h, v, bf16=precision == "bfloat16")
        h64 = x["hidden"].double().requires_grad_(True)
        w64 = x["weight"].double().requires_grad_(True)
        teacher64 = x["teacher_hidden"].double() @ x["teacher_weight"].double().T
        per_token, _ = per_token_divergence(h64 @ w64.T, teacher64, None, LossKnobs.from_config(LossConfig()))
        ref = per_token.mean()
        ref.backward()
        ref = ref.detach()
        loss, grad_h, grad_w = _fused_loss(x)
        errors = {
            "loss": abs(float(loss) - float(ref)) / abs(float(ref)),
            "grad_hidden": float((grad_h.double() - h64.grad).norm() / h64.grad.norm()),
            "grad_head": float((grad_w.double() - w64.grad).norm() / w64.grad.norm()),
        }
        ok = errors["loss"] <= tol["loss"] and max(errors["grad_hidden"], errors["grad_head"]) <= tol["grad"]
        checks.append(
            {
                "precision": precision,
                "reference_loss": float(ref),
                "relative_errors": errors,
                "tolerance": tol,
                "ok": ok,
            }
        )
        res.put(tokens=n, hidden=h, vocab=v, checks=checks)
        del x, h64, w64, teacher64, per_token, ref
    bad = [f"{c['precision']}: {c['relative_errors']} above {c['tolerance']}" for c in checks if not c["ok"]]
    res.put(status="failed", error="; ".join(bad)) if bad else res.put(status="ok")


def part_train_step_device(res: Result, dry: bool, work: Path) -> None:
    """One step on CPU and one on CUDA (CPU again in the dry run), each in its own process, on the same
    rollouts (sampled once, on CPU): the loss, the gradient norm and the weight change must agree."""
    import torch
    from safetensors.torch import load_file

    sides = {}
    for side in ("cpu", _device(dry)) if not dry else ("cpu", "cpu-again"):
        out = work / f"step_{side}"
        cmd = [sys.executable, __file__, "--worker", "train_step_side", "--side", side, "--work", str(work)]
        cmd += ["--result", str(out.with_suffix(".json"))] + (["--dry-run"] if dry else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["no output"]
            res.put(status="failed", error=f"the {side} step failed: {lines[-1][:300]}")
            return
        sides[side] = json.loads(out.with_suffix(".json").read_text())
        res.put(**{f"{side}_metrics": sides[side]["metrics"]})
    a, b = (sides[s] for s in sides)
    da, db = load_file(a["delta_file"]), load_file(b["delta_file"])
    num = sum(float((da[k].double() - db[k].double()).norm() ** 2) for k in da) ** 0.5
    den = sum(float(da[k].double().norm() ** 2) for k in da) ** 0.5
    rel = {
        "loss": abs(a["metrics"]["divergence"] - b["metrics"]["divergence"]) / abs(a["metrics"]["divergence"]),
        "grad_norm": abs(a["metrics"]["grad_norm"] - b["metrics"]["grad_norm"]) / a["metrics"]["grad_norm"],
        "weight_change": num / max(den, 1e-30),
    }
    # fp32 on both sides: the loss and gradient norm agree to ~1e-6; AdamW's first step moves each
    # weight by ~lr * sign(gradient), so a weight whose gradient is ~0 may move differently: 1e-2.
    tol = {"loss": 1e-4, "grad_norm": 1e-3, "weight_change": 1e-2}
    res.put(relative_differences=rel, tolerances=tol, torch_cuda=torch.version.cuda)
    bad = [f"{k} {rel[k]:.2e} > {tol[k]}" for k in rel if not rel[k] <= tol[k]]
    res.put(status="failed", error="; ".join(bad)) if bad else res.put(status="ok")


def worker_train_step_side(res: Result, dry: bool, work: Path, side: str) -> None:
    import gpu_models
    import torch
    from safetensors.torch import load_file, save_file

    from vopd.rollout import Rollouts
    from vopd.trainer import train_step

    device = "cuda" if side == "cuda" else "cpu"
    config = gpu_models.shrink(gpu_models.real_config("qwen3_vl_2b"))
    # Built on CPU on both sides (CPU and CUDA generators draw different weights), moved by setup.
    gpu_models.register("gpu-check-small", config, "qwen3_vl_2b", device="cpu")
    data = write_data(work / "data_small", count=4, size=224)
    cfg = train_config(
        [
            "model.path=gpu-check-small",
            f"data.train={data}",
            f"output_dir={work / ('run_step_' + side)}",
            f"device={device}",
            "rollout.n=2" if dry else "rollout.n=4",
            "rollout.max_new_tokens=8" if dry else "rollout.max_new_tokens=16",
            "max_steps=1",
            "optim.lr=1e-4",
            "optim.weight_decay=0",
            "threads=2",
        ]
    )
    state, batches, per_step = build_run(cfg)
    micro = [next(batches) for _ in range(per_step)]
    rollout_file = work / "step_rollouts.safetensors"
    if side == "cpu":  # sample once; the other side replays these tokens
        torch.manual_seed(3)
        ro = state.engine.sample(state.policy, micro[0].student.to(device), cfg.rollout)
        fields = {k: getattr(ro, k).cpu() for k in ("response_ids_B_T", "sampler_logp_B_T", "prompt_index_B")}
        save_file({**fields, "mask_B_T": ro.mask_B_T.to(torch.uint8).cpu()}, str(rollout_file))
    saved = load_file(str(rollout_file))
    ro = Rollouts(
        saved["response_ids_B_T"], saved["mask_B_T"].bool(), saved["sampler_logp_B_T"], saved["prompt_index_B"]
    )
    state.engine = ReplayEngine(ro)
    before = {k: p.detach().cpu().clone() for k, p in state.policy.named_parameters()}
    metrics = train_step(state, micro)
    delta = {k: p.detach().cpu() - before[k] for k, p in state.policy.named_parameters()}
    delta_file = work / f"step_delta_{side}.safetensors"
    save_file(delta, str(delta_file))
    keep = ("divergence", "grad_norm", "response_tokens", "time_step")
    res.put(metrics={k: float(metrics[k]) for k in keep}, delta_file=str(delta_file), status="ok")


def _train_part(
    res: Result,
    dry: bool,
    work: Path,
    *,
    name: str,
    shape: str,
    overrides: list[str],
    steps: int,
    strategy: str,
    teacher: str,
    lora_r: int = 0,
) -> None:
    """Build ``shape`` (shrunk in the dry run) on the device, run ``steps`` train steps, measure the last."""
    import gpu_models
    import torch
    from gpu_flops import dense_bf16_peak, update_flops

    from vopd.scoring import sharing_mode
    from vopd.trainer import train_step

    device = _device(dry)
    config = gpu_models.real_config(shape)
    if dry:
        config = gpu_models.shrink(config)
    summary = gpu_models.shape_summary(config, gpu_models.count_parameters(config))
    res.put(shape=shape, shape_summary=summary, memory_meter=_memory_meter(device))
    spec = f"gpu-check-{name}"
    gpu_models.register(spec, config, shape, device=device)
    size = 224 if dry else 672
    data = write_data(work / f"data_{size}", count=4, size=size)
    cfg = train_config(
        [f"model.path={spec}", f"data.train={data}", f"output_dir={work / ('run_' + name)}", f"device={device}"]
        + (["rollout.max_new_tokens=8", "threads=2"] if dry else [])
        + overrides
        + [f"max_steps={steps}"]
    )
    t0 = time.perf_counter()
    state, batches, per_step = build_run(cfg)
    _sync(device)
    res.put(setup_seconds=round(time.perf_counter() - t0, 2), loaded_bytes=_allocated_bytes(device))
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else ""
    recorder = RecordingEngine(state.engine)
    state.engine = recorder
    history = []
    for step in range(steps):
        micro = [next(batches) for _ in range(per_step)]
        metrics = train_step(state, micro)
        state.step += 1
        _sync(device)
        history.append({k: float(v) for k, v in metrics.items()})
        ro = recorder.last
        # The teacher (an EMA copy, or the same model with adapters off) has the student's checkpointing.
        mode = sharing_mode(state.policy, "prefix")
        student, teacher_view = view_work(micro[0].student, ro, mode), view_work(micro[0].teacher, ro, mode)
        size_ = model_size(state.policy, summary)
        flops = update_flops(size_, [student], [teacher_view], lora=lora_r > 0)
        update_s = metrics["time_step"] - metrics["time_sample"]
        peak = dense_bf16_peak(device_name)
        tokens = int(metrics["response_tokens"])
        plan_total, plan_parts = memplan_estimate(
            summary,
            strategy=strategy,
            teacher=teacher,
            tokens=len(student.responses) * (student.prompt_tokens + max(student.responses)),
            lora_r=lora_r,
        )
        res.put(
            steps=history,
            measured_step=step + 1,
            step_seconds={
                k.removeprefix("time_"): round(float(v), 3) for k, v in metrics.items() if k.startswith("time_")
            },
            rollout_tokens_per_s=round(tokens / metrics["time_sample"], 1),
            response_tokens=tokens,
            scoring_mode=mode,
            prompt_tokens={"student": student.prompt_tokens, "teacher": teacher_view.prompt_tokens},
            vision_patches={"student": student.patches, "teacher": teacher_view.patches},
            peak_memory_bytes=_peak_bytes(device),
            memplan_bytes=plan_total,
            memplan_parts=plan_parts,
            update_flops=flops,
            update_seconds=round(update_s, 3),
            achieved_flops_per_s=flops / update_s,
            peak_flops_per_s=peak,
            mfu=flops / update_s / peak if peak else None,
            layer_params=size_.layer_params,
            vision_params=size_.vision_params,
        )
    finite = all(h["divergence"] == h["divergence"] and abs(h["divergence"]) < float("inf") for h in history)
    res.put(status="ok") if finite else res.put(status="failed", error=f"non-finite loss: {history}")


def part_full_ft(res: Result, dry: bool, work: Path) -> None:
    gpu = [] if dry else ["mixed_precision=bf16", "rollout.max_new_tokens=512"]
    overrides = ["model.dtype=float32", "model.gradient_checkpointing=true", "teacher.kind=ema"] + gpu
    _train_part(
        res,
        dry,
        work,
        name="full_ft",
        shape="qwen3_vl_2b",
        overrides=overrides,
        steps=1 if dry else 2,
        strategy="ddp",
        teacher="ema",
    )


def part_lora(res: Result, dry: bool, work: Path) -> None:
    gpu = [] if dry else ["model.dtype=bfloat16", "mixed_precision=bf16", "rollout.max_new_tokens=256"]
    overrides = ["lora.r=16", "teacher.kind=frozen", "model.gradient_checkpointing=true"] + gpu
    _train_part(
        res,
        dry,
        work,
        name="lora",
        shape="qwen2_5_vl_7b",
        overrides=overrides,
        steps=1 if dry else 2,
        strategy="lora",
        teacher="frozen",
        lora_r=16,
    )


def part_loss_scale(res: Result, dry: bool, work: Path) -> None:
    """Peak memory and time of the loss with its gradients at the paper's response tokens per step
    (8 rollouts x 1024), inputs as under mixed_precision=bf16: fused (a linear head, chunks of 128) vs
    one piece (the student's full [N, V] logits, as ``naive=true`` and the released code do)."""
    import torch

    device = _device(dry)
    n = 64 if dry else 8 * 1024
    cells = []
    for vocab, hidden in ((151_936, 2048), (248_320, 2560)):  # Qwen3-VL-2B's and Qwen3.5-4B's head
        h = 64 if dry else hidden
        for path in ("fused", "one_piece"):
            cell: dict[str, Any] = {"vocab": vocab, "hidden": h, "tokens": n, "path": path}
            x = _loss_inputs(device, n, h, vocab, bf16=not dry)
            _sync(device)
            base = _allocated_bytes(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                loss, _, _ = _fused_loss(x, one_piece=path == "one_piece")
                _sync(device)
                cell.update(
                    seconds=round(time.perf_counter() - t0, 3),
                    peak_memory_bytes=_peak_bytes(device) - base,
                    loss=float(loss),
                )
            except torch.OutOfMemoryError as err:
                cell["out_of_memory"] = str(err).strip().splitlines()[0][:200]
            del x
            if device == "cuda":
                torch.cuda.empty_cache()
            cells.append(cell)
            res.put(cells=cells, memory_meter=_memory_meter(device) + ", above the inputs and weights")
    res.put(status="ok")


def part_fsdp2(res: Result, dry: bool, work: Path) -> None:
    """Two fsdp2 steps under torchrun with one process: accelerate's process group (NCCL on CUDA)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", __file__]
    cmd += ["--worker", "fsdp2_rank", "--result", str(res.path), "--work", str(work)] + (["--dry-run"] if dry else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-6000:] + proc.stderr[-6000:])
    rank = json.loads(res.path.read_text()) if res.path.is_file() else {}
    res.clear()
    res.update(rank)
    if proc.returncode != 0 and res.get("status") != "failed":
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["no output"]
        res.put(status="failed", error=f"torchrun exit {proc.returncode}: {lines[-1][:300]}")
    res.save()


def worker_fsdp2_rank(res: Result, dry: bool, work: Path) -> None:
    import gpu_models
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from vopd.trainer import train_step

    device = _device(dry)
    config = gpu_models.shrink(gpu_models.real_config("qwen3_vl_2b"), **({} if dry else {"hidden": 512, "layers": 4}))
    gpu_models.register("gpu-check-fsdp2", config, "qwen3_vl_2b", device=device)
    data = write_data(work / "data_small", count=4, size=224)
    cfg = train_config(
        [
            "model.path=gpu-check-fsdp2",
            f"data.train={data}",
            f"output_dir={work / 'run_fsdp2'}",
            f"device={device}",
            "parallel.strategy=fsdp2",
            "teacher.kind=ema",
            "max_steps=2",
        ]
        # On CPU every decoding step gathers each layer over gloo: few, short rollouts.
        + (
            ["rollout.n=2", "rollout.max_new_tokens=4", "threads=2"]
            if dry
            else ["rollout.n=4", "rollout.max_new_tokens=16", "mixed_precision=bf16"]
        )
    )
    state, batches, per_step = build_run(cfg)
    backend = dist.get_backend() if dist.is_initialized() else None
    sharded = any(isinstance(p, DTensor) for p in state.policy.parameters())
    history = []
    for _ in range(2):
        metrics = train_step(state, [next(batches) for _ in range(per_step)])
        state.step += 1
        _sync(device)
        history.append({k: float(v) for k, v in metrics.items()})
        res.put(
            backend=backend,
            world_size=dist.get_world_size() if dist.is_initialized() else None,
            sharded=sharded,
            steps=history,
        )
    step = history[-1]
    res.put(
        step_seconds={k.removeprefix("time_"): v for k, v in step.items() if k.startswith("time_")},
        peak_memory_bytes=_peak_bytes(device),
        memory_meter=_memory_meter(device),
    )
    want = "gloo" if device == "cpu" else "nccl"
    problems = [] if want in str(backend) else [f"backend {backend}, expected {want}"]
    problems += [] if sharded else ["the policy holds no DTensor parameters (not sharded)"]
    problems += [] if all(abs(h["divergence"]) < float("inf") for h in history) else ["non-finite loss"]
    res.put(status="failed", error="; ".join(problems)) if problems else res.put(status="ok")


WORKERS = {
    "env": part_env,
    "loss_cuda": part_loss_cuda,
    "train_step_device": part_train_step_device,
    "full_ft": part_full_ft,
    "lora": part_lora,
    "loss_scale": part_loss_scale,
    "fsdp2": part_fsdp2,
    "fsdp2_rank": worker_fsdp2_rank,
}


def run_worker(name: str, result: Path, work: Path, dry: bool, side: str | None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    res = Result(result)
    try:
        if name == "train_step_side":
            worker_train_step_side(res, dry, work, side or "cpu")
        else:
            WORKERS[name](res, dry, work)
    except Exception as err:  # the part fails; the check goes on with the next one
        traceback.print_exc()
        res.put(
            status="failed",
            error=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}",
        )
        return 1
    return 0 if res.get("status") == "ok" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json, gpu_check.md and gpu_check.log")
    parser.add_argument("--dry-run", action="store_true", help="CPU, shrunk shapes: the same code paths in ~1 minute")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="time for all parts (default 420 on GPU, 1200 dry)"
    )
    parser.add_argument("--parts", default=",".join(p.name for p in PARTS), help="comma-separated subset, in run order")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.result, args.work, args.dry_run, args.side)
    if args.out is None:
        parser.error("--out DIR is required")
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - {p.name for p in PARTS})
    if unknown:
        parser.error(f"unknown part(s) {unknown}; parts: {', '.join(p.name for p in PARTS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="vopd-gpu-check-"))
    budget = args.budget_s or (1200.0 if args.dry_run else 420.0)
    report = orchestrate(args.out, dry=args.dry_run, budget_s=budget, parts=parts, work=work)
    failed = [n for n, p in report["parts"].items() if p["status"] != "ok"]
    print(f"[gpu_check] wrote {args.out / 'gpu_check.json'}; not ok: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
