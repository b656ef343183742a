"""Benchmark 6: peak memory per rank by strategy (ddp, fsdp2, LoRA; 1 and 2 processes) with an EMA
teacher, on a ~100M-parameter random Qwen2-VL, checked against `memplan.py`'s estimate.

Every configuration runs in its own process(es) (`torchrun --standalone` for 2, gloo on CPU). Per
rank: RSS after imports, RSS after `setup` (model, teacher, optimiser, data loaded), and the
kernel's peak RSS over the training steps (`common.ProcessPeak`, counter reset after loading). The
training footprint compared with the estimate is peak RSS minus RSS after imports (what the run
holds: weights, teacher, gradients, AdamW, activations), which the estimate's state part should
track; the first step creates AdamW's moments, so they are inside the measured window.

    python benchmarks/bench_memory.py [--quick]      # writes results/memory_strategies*.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import ProcessPeak, machine, machine_markdown, rss_mb, run_ranks, toy_run_overrides, write_results  # noqa: E402
from memplan import ModelShape, state_bytes  # noqa: E402

CONFIGS = {  # name: (processes, overrides)
    "ddp-1": (1, []),
    "ddp-2": (2, []),
    "fsdp2-1": (1, ["parallel.strategy=fsdp2"]),
    "fsdp2-2": (2, ["parallel.strategy=fsdp2"]),
    "lora-1": (1, ["lora.r=16"]),
    "lora-2": (2, ["lora.r=16"]),
}
SHAPE = {"text_hidden": 640, "text_layers": 10, "vision_dim": 128, "vision_depth": 2, "vocab": 32000}


def worker(model_dir: str, out: str, overrides: list[str]) -> None:
    """One rank of one configuration: train 2 steps, write this rank's memory to ``out``.rank.json."""
    import vopd.toyworld  # noqa: F401  registers toyworld:N
    import vopd.trainer as trainer
    from vopd.config import load_config

    imported = rss_mb()
    meter, marks = ProcessPeak(), {}
    real_setup = trainer.setup

    def setup(*args, **kwargs):  # benchmark-only hook: start the window once everything is loaded
        result = real_setup(*args, **kwargs)
        meter.start()
        return result

    trainer.setup = setup

    rank = int(os.environ.get("RANK", "0"))

    def after_step(state):
        marks.update(meter.stop())
        if state.step == 2:  # done: skip the final checkpoint (slow, and not a training step)
            Path(f"{out}.{rank}.json").write_text(json.dumps({"rss_after_imports_mb": imported, **marks}))
            sys.stdout.flush()
            os._exit(0)
        return {}

    cfg = load_config(None, [*toy_run_overrides(model_dir, f"{out}.run"), *overrides])
    trainer.train(cfg, callbacks=[after_step])
    raise RuntimeError("the run ended before step 2")


def measure(model_dir: Path, tmp: Path, name: str, threads: int) -> list[dict]:
    nproc, overrides = CONFIGS[name]
    return run_ranks(
        HERE / "bench_memory.py", model_dir, tmp / name, *overrides, threads=threads, nproc=nproc, what=name
    )


def model_shape(model_dir: Path) -> tuple[ModelShape, int]:
    import math

    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as fh:
        params = sum(math.prod(fh.get_slice(key).get_shape()) for key in fh.keys())
    shape = ModelShape("bench", params, SHAPE["text_hidden"], SHAPE["text_layers"], SHAPE["vocab"], tied=False)
    return shape, params


def report(result: dict, mach: dict) -> str:
    shape = ModelShape(**result["shape"])
    lines = [
        "# Benchmark 6: peak memory per rank by strategy (EMA teacher)",
        "",
        machine_markdown(mach),
        "",
        f"Model: random Qwen2-VL, {shape.params / 1e6:.0f}M parameters (text {SHAPE['text_hidden']} x "
        f"{SHAPE['text_layers']} layers, vocabulary {SHAPE['vocab']}, vision {SHAPE['vision_dim']} x "
        f"{SHAPE['vision_depth']}), fp32, EMA teacher (fp32 copy; LoRA: a second adapter), 2 steps of 2 prompts "
        "x 2 rollouts x up to 8 tokens (toy-world images), one prompt per micro-batch. Each configuration in "
        "its own process(es); 2 processes = `torchrun --standalone`, gloo. LoRA: r=16 on q/k/v/o/gate/up/down.",
        "",
        "Columns per rank: **footprint** = peak RSS - RSS after imports (what training holds); **above "
        "loaded** = peak RSS during the steps - RSS after loading (kernel peak counter reset after setup: "
        "activations, gradients, AdamW moments created at step 1); **estimate** = `memplan.state_bytes` "
        "(weights + teacher + gradients + AdamW, + FSDP2's gathered units), activations not included.",
        "",
        "| strategy | processes | footprint MB per rank (max over ranks) | above loaded MB | estimate MB | "
        "footprint / estimate |",
        "|---|---|---|---|---|---|",
    ]
    for name, ranks in result["configs"].items():
        strategy, nproc = name.rsplit("-", 1)
        foot = max(r["peak_rss_mb"] - r["rss_after_imports_mb"] for r in ranks)
        above = max(r["peak_above_loaded_mb"] for r in ranks)
        est = (
            sum(state_bytes(shape, strategy=strategy, world=int(nproc), bf16=False, lora_r=16, base_bytes=4).values())
            / 2**20
        )
        lines.append(f"| {strategy} | {nproc} | {foot:.0f} | {above:.0f} | {est:.0f} | {foot / est:.2f} |")
    lines += [
        "",
        "The estimate counts state only; the measured footprint adds activations, the processor, "
        "allocator slack and (fsdp2) communication buffers. Reset of the peak counter worked: "
        f"{all(r['reset'] for ranks in result['configs'].values() for r in ranks)}. Compare strategies by "
        "footprint: a frozen base that nothing has touched yet can still be a lazily mapped file after setup "
        '(lora, 1 process: its pages count only once the steps read them, so they land in "above loaded"); '
        "2-process runs touch every weight at setup (DDP's broadcast, FSDP2's sharding).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1], argv[2], argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="same runs (the benchmark is already small)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from common import build_shaped_model

    tmp = Path(tempfile.mkdtemp(prefix="vopd_bench_memory_"))
    model_dir = build_shaped_model(tmp, SHAPE)
    shape, _ = model_shape(model_dir)
    mach = machine()
    configs = {}
    for name in args.only or list(CONFIGS):
        configs[name] = measure(model_dir, tmp, name, args.threads)
        print(name, json.dumps(configs[name]), flush=True)
    result = {"machine": mach, "shape": shape.__dict__, "configs": configs}
    write_results("memory_strategies" + ("_quick" if args.quick else ""), result, report(result, mach))


if __name__ == "__main__":
    main()
