"""Run every benchmark, one after another, each in its own process (clean peak-memory baseline).

    python benchmarks/run_all.py --quick      # a few minutes on 2 cores; writes benchmarks/results/*_quick.*
    python benchmarks/run_all.py              # the larger settings (tens of minutes on 2 cores)
    python benchmarks/run_all.py --only loss  # one of: peer, vopd, loss

Each child runs with MALLOC_MMAP_THRESHOLD_=65536 (see benchmarks/common.py for why) and
HF_HUB_OFFLINE=1 (everything is built from configs; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {"peer": "bench_peer.py", "vopd": "bench_vopd.py", "loss": "bench_loss.py"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings (minutes)")
    parser.add_argument("--only", choices=sorted(SCRIPTS), action="append", help="run only these (repeatable)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per benchmark (default 2)")
    args = parser.parse_args(argv)
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(args.threads),
    )
    failed = []
    for name in args.only or list(SCRIPTS):
        start = time.perf_counter()
        cmd = [sys.executable, str(HERE / SCRIPTS[name])] + (["--quick"] if args.quick else [])
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
