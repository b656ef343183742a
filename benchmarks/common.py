"""Shared pieces of the benchmarks: the machine description, a peak-memory meter, the workload
(a small Qwen2-VL built from a config, 336 px images), and result writing.

Peak memory on CPU is the peak *resident set size above the level at the start of the measured
call*, sampled every millisecond from /proc/self/statm by a thread. run_all.py starts every
benchmark with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc serves every tensor larger than 64 KiB
with its own mmap and returns it on free: RSS then follows live tensor memory instead of
keeping freed blocks in the heap. Small allocations and allocator slack are still counted, and a
spike shorter than the sampling period can be missed; peaks are honest to a few MB.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
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
        "cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gb": round(mem_gb, 1), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"),
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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


def build_workload_model(out_dir: Path, *, text_hidden: int = 256, text_layers: int = 4, vision_dim: int = 128,
                         vision_depth: int = 4, vocab: int = 8192, max_pixels: int = 1024 * 28 * 28) -> Path:
    """The benchmark model (random Qwen2-VL, built from a config), saved so both trainers load the same files."""
    from vopd.tiny_models import build_tiny_model, save_tiny

    heads = max(2, text_hidden // 64)
    text = {"hidden_size": text_hidden, "num_hidden_layers": text_layers, "intermediate_size": 4 * text_hidden,
            "vocab_size": vocab, "num_attention_heads": heads, "num_key_value_heads": heads,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}}
    vision = {"embed_dim": vision_dim, "depth": vision_depth, "num_heads": max(2, vision_dim // 64)}
    model, processor = build_tiny_model("qwen2_vl", seed=0, text=text, vision=vision)
    processor.image_processor.max_pixels = max_pixels
    processor.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": max_pixels}
    return save_tiny(model, processor, out_dir)


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def machine_markdown(m: dict[str, Any]) -> str:
    return (f"Machine: {m['cpu']}, {m['logical_cores']} logical cores (torch threads {m['torch_threads']}), "
            f"{m['memory_gb']} GB RAM; torch {m['torch']}, transformers {m['transformers']}; load average at start "
            f"{m['load_average_at_start']} (shared machine); MALLOC_MMAP_THRESHOLD_={m['malloc_mmap_threshold']}.\n")
