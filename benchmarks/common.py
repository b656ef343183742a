"""Shared pieces of the benchmarks: the machine description, peak-memory meters, the workload
(a small Qwen2-VL built from a config, 336 px images), and result writing.

Memory on CPU (there is no ``max_memory_allocated``). The trusted measure is
:class:`ProcessPeak`: each configuration runs in **its own process**; once everything is loaded
(model, teacher, optimiser, data) the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``
"5") and read back (``VmHWM``) after the measured steps. Reported: peak RSS minus the RSS after
loading, i.e. what the training steps add on top of the loaded state (activations, gradients,
AdamW state created at the first step, sampling caches), exactly as the kernel counted it (no
sampling thread that can miss a spike). A fresh process matters: in a warmed-up process the heap
already holds the previous steps' freed blocks, so "peak above the step start" reads ~0 MB (the
flaw of the per-step meter this replaces). Where ``clear_refs`` is not writable the reset is
skipped and the peak includes the loading transients (reported as ``reset: false``).

:class:`PeakRSS` (sampled RSS above the start of one call, every millisecond) stays for
`bench_loss.py`, whose every measurement already runs in a fresh process with
``MALLOC_MMAP_THRESHOLD_=65536`` (large tensors get their own mapping and are returned on free).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

RESULTS = Path(__file__).resolve().parent / "results"
QUESTION = "What color is the shape inside the box?"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import transformers

    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"),
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_mb() -> float:
    """Resident set size now (MB)."""
    return _status_kb("VmRSS") / 1024


def hwm_mb() -> float:
    """The kernel's peak resident set size of this process (MB)."""
    return _status_kb("VmHWM") / 1024


class ProcessPeak:
    """Peak RSS of this process from :meth:`start` (after loading) to :meth:`stop`, minus the RSS at start."""

    def start(self) -> None:
        import gc

        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            self.reset = True
        except OSError:
            self.reset = False
        self.loaded_mb = rss_mb()

    def stop(self) -> dict[str, float]:
        peak = hwm_mb()
        return {
            "loaded_rss_mb": self.loaded_mb,
            "peak_rss_mb": peak,
            "peak_above_loaded_mb": peak - self.loaded_mb,
            "reset": self.reset,
        }


class PeakRSS:
    """Peak RSS above the starting level while the block runs (``.peak_mb``)."""

    def __init__(self, period_s: float = 0.001):
        self.period_s = period_s
        self.peak_mb = 0.0

    @contextmanager
    def measure(self):
        start = _rss_bytes()
        peak = [start]
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_bytes())
                time.sleep(self.period_s)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            peak[0] = max(peak[0], _rss_bytes())
            self.peak_mb = (peak[0] - start) / 2**20


def timed(fn, *args, **kwargs) -> tuple[Any, float, float]:
    """(result, seconds, peak RSS delta in MB) of one call."""
    meter = PeakRSS()
    with meter.measure():
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
    return out, seconds, meter.peak_mb


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def scene(i: int, size: int = 336) -> Image.Image:
    """A deterministic synthetic photo-like image: noise background and a few coloured shapes."""
    g = torch.Generator().manual_seed(i)
    noise = (torch.rand(size, size, 3, generator=g) * 80 + 120).to(torch.uint8).numpy()
    img = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(img)
    colours = ["red", "blue", "green", "yellow", "purple"]
    for k in range(4):
        x, y = (torch.randint(0, size - size // 5, (2,), generator=g)).tolist()
        draw.ellipse((x, y, x + size // 6, y + size // 6), fill=colours[(i + k) % len(colours)])
    return img


def build_workload_model(
    out_dir: Path,
    *,
    text_hidden: int = 256,
    text_layers: int = 4,
    vision_dim: int = 128,
    vision_depth: int = 4,
    vocab: int = 8192,
    max_pixels: int = 1024 * 28 * 28,
) -> Path:
    """The benchmark model (random Qwen2-VL, built from a config), saved so both trainers load the same files."""
    from vopd.tiny_models import build_tiny_model, save_tiny

    heads = max(2, text_hidden // 64)
    text = {
        "hidden_size": text_hidden,
        "num_hidden_layers": text_layers,
        "intermediate_size": 4 * text_hidden,
        "vocab_size": vocab,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
    }
    vision = {"embed_dim": vision_dim, "depth": vision_depth, "num_heads": max(2, vision_dim // 64)}
    model, processor = build_tiny_model("qwen2_vl", seed=0, text=text, vision=vision)
    processor.image_processor.max_pixels = max_pixels
    processor.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": max_pixels}
    return save_tiny(model, processor, out_dir)


def build_shaped_model(tmp: Path, shape: Mapping[str, int]) -> Path:
    """The workload model of ``shape`` (`bench_memory.SHAPE`), 256-patch images, built in ``tmp``/model."""
    return build_workload_model(tmp / "model", **shape, max_pixels=256 * 28 * 28)


def toy_run_overrides(model_dir: str, output_dir: str, *, steps: bool = True, extra: Sequence[str] = ()) -> list[str]:
    """`load_config` overrides shared by the workers' toy-world EMA runs (``steps``: a 2-step run, no saves)."""
    train = ["rollout.n=2", "rollout.max_new_tokens=8"] if steps else []
    budget = ["max_steps=2", "save_every=0"] if steps else []
    warmup = ["optim.warmup_steps=0"] if steps else []
    return [
        f"model.path={model_dir}",
        "data.train=toyworld:8:0",
        *train,
        "teacher.kind=ema",
        "prompts_per_step=2",
        "micro_batch_prompts=1",
        *budget,
        "report_to=[jsonl]",
        "device=cpu",
        *warmup,
        *extra,  # per-script settings, just before the output folder
        f"output_dir={output_dir}",
    ]


def run_ranks(
    script: Path, model_dir: Path, out: Path, *args: str, threads: int, nproc: int = 2, what: str = "the run"
) -> list[dict[str, Any]]:
    """Launch ``script --worker model_dir out *args`` on ``nproc`` processes (torchrun if 2+); each rank's JSON."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="65536")
    argv = [str(script), "--worker", str(model_dir), str(out), *args]
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run(
        [sys.executable, *argv] if nproc == 1 else [*torchrun, *argv], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(nproc)]


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def machine_markdown(m: dict[str, Any]) -> str:
    return (
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores (torch threads {m['torch_threads']}), "
        f"{m['memory_gb']} GB RAM; torch {m['torch']}, transformers {m['transformers']}; load average at start "
        f"{m['load_average_at_start']} (shared machine); MALLOC_MMAP_THRESHOLD_={m['malloc_mmap_threshold']}.\n"
    )
