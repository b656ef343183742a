"""Benchmark 1: vopd vs TRL's DistillationTrainer on equal work, alternating in one process.

Both train the same random Qwen2-VL (built from a config: text 256 x 4 layers, vision 128 x 4,
vocabulary 8192) on the same 336 px images (144 image tokens each) and question, with P prompts
per step, n rollouts per prompt, responses of up to T tokens sampled at temperature 1, the
generalized JSD with the same beta over the full vocabulary, a frozen teacher that sees the same
image as the student (vopd: teacher.view=full), AdamW, fp32, no gradient checkpointing. TRL's
trainer draws one completion per prompt row, so its batch holds each prompt n times (the same
P x n sequences per step as vopd).

Rounds alternate: TRL for W + K steps, then vopd for W + K steps, repeated, **each block in its own
process**; the first W steps of each block are warm-up and not timed. A step is everything from
taking the batch to the optimiser step (sampling included). Peak memory (`common.ProcessPeak`):
the kernel's peak RSS over all W + K steps of the block minus the RSS after loading (model,
teacher, data), in that fresh process.

    python benchmarks/bench_peer.py [--quick]
    python benchmarks/bench_peer.py --quick --real tests/data/real_models/qwen2_5_vl_7b_instruct --hidden 1024

``--real SRC`` trains a random model built from a real checkpoint's small files instead (`vopd model
random`: SRC's vocabulary, tokenizer, chat template and processor; ``--layers`` text layers,
``--vision-layers`` vision blocks, ``--hidden`` text width), written to
``results/peer_trl_real_<SRC name>_h<H>[_quick]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    QUESTION,
    ProcessPeak,
    build_workload_model,
    machine,
    machine_markdown,
    scene,
    summary,
    timed,
    write_results,
)


def trl_block(
    model_dir: Path, *, P: int, n: int, T: int, beta: float, steps: int, warmup: int, out: Path, meter: ProcessPeak
) -> list[dict]:
    """Run TRL's DistillationTrainer for warmup + steps steps; per-step seconds (``meter`` starts at step 1)."""
    import time

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from vopd.models import load_model

    model, processor = load_model(str(model_dir))
    teacher = copy.deepcopy(model).eval()
    rows = [
        {"prompt": [{"role": "user", "content": QUESTION}], "image": scene(i)}
        for i in range(P * (warmup + steps))
        for _ in range(n)
    ]
    records: list[dict] = []

    class StepMeter(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not records and not hasattr(self, "t0"):
                meter.start()  # everything is loaded: model, teacher, data
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            records.append({"seconds": time.perf_counter() - self.t0})

    args = DistillationConfig(
        output_dir=str(out),
        per_device_train_batch_size=P * n,
        gradient_accumulation_steps=1,
        max_steps=warmup + steps,
        max_completion_length=T,
        temperature=1.0,
        top_p=1.0,
        beta=beta,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        logging_steps=10_000,
        report_to=[],
        save_strategy="no",
        dataloader_num_workers=0,
        shuffle_dataset=False,
        seed=0,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=model,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        callbacks=[StepMeter()],
    )
    trainer.train()
    return records[warmup:]


class VopdRunner:
    """vopd's train_step on prompt batches built the same way (one micro-batch of P prompts)."""

    def __init__(
        self,
        model_dir: Path,
        *,
        P: int,
        n: int,
        T: int,
        beta: float,
        out: Path,
        naive: bool = False,
        sharing: str | None = None,
        image_size: int = 336,
    ):
        import vopd.toyworld  # noqa: F401  registers the toyworld:N data spec
        from vopd.config import load_config
        from vopd.train_setup import setup

        cfg = load_config(
            None,
            [
                f"model.path={model_dir}",
                "data.train=toyworld:4:0",
                f"rollout.n={n}",
                f"rollout.max_new_tokens={T}",
                "rollout.temperature=1.0",
                f"loss.beta={beta}",
                "loss.estimator=full",
                "teacher.kind=frozen",
                "teacher.view=full",
                f"prompts_per_step={P}",
                f"micro_batch_prompts={P}",
                "optim.lr=1e-5",
                "optim.warmup_steps=0",
                "report_to=[jsonl]",
                f"output_dir={out}",
                f"naive={str(naive).lower()}",
                "device=cpu",
            ],
        )
        self.state = setup(cfg).state
        self.P, self.sharing, self.image_size, self.count = P, sharing, image_size, 0

    def step(self) -> dict:
        from vopd.data import PromptPair
        from vopd.models import build_prompts
        from vopd.trainer import train_step

        images = [scene(self.count * self.P + i, self.image_size) for i in range(self.P)]
        self.count += 1
        prompts = build_prompts(self.state.processor, images, [QUESTION] * self.P)  # collation is not timed (workers)
        pair = PromptPair(student=prompts, teacher=prompts, sample_ids=[str(i) for i in range(self.P)])
        # peak_mb: the sampled per-step meter, kept for bench_vopd.py's ablation table only (peak above the
        # step start in a warmed-up process: see common.py); this benchmark reports ProcessPeak instead.
        metrics, seconds, peak = timed(train_step, self.state, [pair], sharing=self.sharing)
        return {
            "seconds": seconds,
            "peak_mb": peak,
            "response_tokens": metrics["response_tokens"],
            **{k: v for k, v in metrics.items() if k.startswith("time_")},
        }


def _settings(quick: bool) -> tuple[dict, tuple[int, int, int]]:
    work = {"P": 2, "n": 4, "T": 16, "beta": 0.5} if quick else {"P": 2, "n": 8, "T": 32, "beta": 0.5}
    return work, ((2, 1, 2) if quick else (3, 1, 3))


def block(kind: str, model_dir: Path, out: Path, quick: bool) -> dict:
    """One trainer's W + K steps in this (fresh) process: step times and the block's peak memory."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    work, (_, warmup, steps) = _settings(quick)
    meter = ProcessPeak()
    if kind == "trl":
        records = trl_block(model_dir, steps=steps, warmup=warmup, out=out, meter=meter, **work)
    else:
        runner = VopdRunner(model_dir, out=out, **work)
        meter.start()
        records = [runner.step() for _ in range(warmup + steps)][warmup:]
    return {"records": records, "memory": meter.stop()}


def real_model(*, src: Path, out: Path, layers: int, vision_layers: int, hidden: int | None) -> tuple[Path, str]:
    """A random fp32 model from a real checkpoint's config and small files; (folder, description)."""
    from transformers import AutoConfig

    from vopd.random_model import write_random_model

    made = write_random_model(
        src, out, layers=layers, vision_layers=vision_layers, hidden=hidden, dtype="float32", seed=0
    )
    cfg = AutoConfig.from_pretrained(out)
    text = getattr(cfg, "text_config", cfg)
    vision = cfg.vision_config
    desc = (
        f"random {made.model_type} from the real files of `{src.name}` ({made.parameters / 1e6:.0f}M parameters: "
        f"text {text.hidden_size} x {text.num_hidden_layers} layers, intermediate {text.intermediate_size}, "
        f"heads {text.num_attention_heads}/{text.num_key_value_heads} kv, vision "
        f"{getattr(vision, 'hidden_size', getattr(vision, 'embed_dim', '?'))} x {vision.depth}, vocabulary "
        f"{text.vocab_size:,}, tied head {bool(getattr(cfg, 'tie_word_embeddings', False))}; the real tokenizer, "
        "chat template and image processor)"
    )
    return out, desc


def run(quick: bool, real: dict | None = None) -> dict:
    work, (rounds, warmup, steps) = _settings(quick)
    tmp = Path(tempfile.mkdtemp(prefix="vopd_bench_peer_"))
    if real:
        model_dir, desc = real_model(out=tmp / "model", **real)
    else:
        model_dir = build_workload_model(tmp / "model")
        desc = "random Qwen2-VL (text 256 x 4 layers, vision 128 x 4, vocab 8192)"
    out: dict[str, list] = {"trl": [], "vopd": [], "trl_memory": [], "vopd_memory": []}
    for r in range(rounds):
        for kind in ("trl", "vopd"):
            cmd = [
                sys.executable,
                __file__,
                "--block",
                kind,
                "--model-dir",
                str(model_dir),
                "--out",
                str(tmp / f"{kind}{r}"),
            ]
            proc = subprocess.run(cmd + (["--quick"] if quick else []), capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{kind} block failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            out[kind] += res["records"]
            out[f"{kind}_memory"].append(res["memory"])
            print(
                f"round {r}: {kind} {[round(x['seconds'], 2) for x in res['records']]} s, "
                f"peak {res['memory']['peak_above_loaded_mb']:.0f} MB above loaded",
                flush=True,
            )
    return {"workload": work, "model": desc, "rounds": rounds, "warmup": warmup, "steps_per_round": steps, **out}


def report(result: dict, mach: dict) -> str:
    w = result["workload"]
    t_trl, t_vopd = (summary([r["seconds"] for r in result[k]]) for k in ("trl", "vopd"))
    m_trl, m_vopd = (summary([m["peak_above_loaded_mb"] for m in result[f"{k}_memory"]]) for k in ("trl", "vopd"))
    loaded = {k: summary([m["loaded_rss_mb"] for m in result[f"{k}_memory"]])["median"] for k in ("trl", "vopd")}
    phases = {k: summary([r[k] for r in result["vopd"]])["median"] for k in result["vopd"][0] if k.startswith("time_")}
    lines = [
        "# Benchmark 1: vopd vs TRL DistillationTrainer, equal work, alternating blocks (each in its own process)",
        "",
        machine_markdown(mach),
        "",
        f"Workload: {result.get('model', 'random Qwen2-VL (text 256 x 4 layers, vision 128 x 4, vocab 8192)')}, "
        f"336 px images (144 image tokens), P={w['P']} prompts x n={w['n']} rollouts, up to T={w['T']} sampled tokens, "
        f"JSD beta={w['beta']} over the full vocabulary, frozen teacher on the same image, fp32, AdamW. "
        f"{result['rounds']} alternating rounds x {result['steps_per_round']} measured steps "
        f"(+{result['warmup']} warm-up per block).",
        "",
        "Memory: per block (its own process), the kernel's peak RSS over all its steps minus the RSS after "
        "loading model, teacher and data (`common.ProcessPeak`; reset of the peak counter: "
        f"{all(m['reset'] for k in ('trl', 'vopd') for m in result[f'{k}_memory'])}). RSS after loading "
        f"(median): TRL {loaded['trl']:.0f} MB, vopd {loaded['vopd']:.0f} MB.",
        "",
        "| trainer | median s/step (min-max) | median peak MB above loaded, per block (min-max) |",
        "|---|---|---|",
        f"| TRL DistillationTrainer | {t_trl['median']:.2f} ({t_trl['min']:.2f}-{t_trl['max']:.2f}) | "
        f"{m_trl['median']:.0f} ({m_trl['min']:.0f}-{m_trl['max']:.0f}) |",
        f"| vopd | {t_vopd['median']:.2f} ({t_vopd['min']:.2f}-{t_vopd['max']:.2f}) | "
        f"{m_vopd['median']:.0f} ({m_vopd['min']:.0f}-{m_vopd['max']:.0f}) |",
        "",
        f"Ratio vopd / TRL: time {t_vopd['median'] / t_trl['median']:.2f} (target <= 0.5), "
        f"peak memory {m_vopd['median'] / m_trl['median']:.2f} (target <= 1).",
        "",
        "vopd phases (median s): " + ", ".join(f"{k[5:]} {v:.2f}" for k, v in phases.items()) + ".",
        "",
        "vopd samples from one prefill per prompt (the KV cache expanded to its n rollouts, "
        "`scoring.PREFIX_FAMILIES`); TRL's `generate` runs each prompt's prefill once per row. "
        f"Load average (1 min) at start {mach['load_average_at_start'][0]:.2f}, at the end "
        f"{result.get('load_average_end', [float('nan')])[0]:.2f} (2 shared cores). Steps on this shared machine vary "
        "by up to 2x (min-max above), so ratios from one short run carry roughly +-25%.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--block", choices=("trl", "vopd"), help=argparse.SUPPRESS)  # child: one block
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--real", type=Path, help="a real checkpoint's folder (config + small files, no weights)")
    parser.add_argument("--hidden", type=int, default=None, help="--real: text width (default: SRC's)")
    parser.add_argument("--layers", type=int, default=2, help="--real: text layers (default 2)")
    parser.add_argument("--vision-layers", type=int, default=1, help="--real: vision blocks (default 1)")
    args = parser.parse_args(argv)
    if args.block:
        print(json.dumps(block(args.block, args.model_dir, args.out, args.quick)))
        return
    mach = machine()
    real = None
    name = "peer_trl"
    if args.real:
        real = {"src": args.real, "layers": args.layers, "vision_layers": args.vision_layers, "hidden": args.hidden}
        name += f"_real_{args.real.name}_h{args.hidden or 'src'}"
    result = run(args.quick, real)
    result |= {"machine": mach, "quick": args.quick, "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    write_results(name + ("_quick" if args.quick else ""), result, report(result, mach))


if __name__ == "__main__":
    main()
