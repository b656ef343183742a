"""Which wheels a GPU box without network needs to run vopd (`scripts/gpu_check.sh --print-wheels`).

The box described in docs/scaling.md ("The GPU check") has Python 3.12, torch, accelerate, peft,
safetensors and an older transformers. vopd needs transformers >= 5.20, which needs a newer
huggingface-hub, which needs packages that image lacks. This lists the Python packages that
transformers, peft and accelerate need, recursively, at the versions installed *here* (the
combination vopd's tests ran with), minus :data:`ON_THE_BOX`: torch and the common packages such an
image has, whose version ranges are wide. Carried wheels are installed with ``--no-deps`` into a
folder put first on ``PYTHONPATH``, so they win over the image's copies in vopd's processes only.

    python benchmarks/gpu_wheels.py            # prints the pip download command
    python benchmarks/gpu_wheels.py --list     # NAME==VERSION, one a line
"""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, requires, version

#: What vopd imports beyond torch and the image's basics.
ROOTS = ("transformers", "peft", "accelerate")

#: Taken from the box's image, not carried (present there, loose version ranges in these requirements).
ON_THE_BOX = frozenset(
    "torch numpy packaging pyyaml tqdm safetensors filelock fsspec jinja2 markupsafe networkx sympy mpmath "
    "setuptools psutil idna h11 anyio sniffio certifi rich pygments markdown-it-py mdurl shellingham typer "
    "annotated-doc colorama tomli".split()
)

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


#: The box's environment, for evaluating requirement markers.
BOX_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}


def _needed(requirement: str) -> str | None:
    """The normalised name of a requirement that applies on the box (no extra, marker true), or None."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate(BOX_MARKERS):
        return None
    return req.name.lower().replace("_", "-")


def carry_list() -> list[tuple[str, str]]:
    """``(name, version)`` of every package to carry, sorted by name."""
    found: dict[str, str] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in found or name in ON_THE_BOX:
            continue
        try:
            found[name] = version(name)
        except PackageNotFoundError as err:
            raise SystemExit(
                f"{name} is not installed here: install vopd's environment first (scripts/setup.sh)"
            ) from err
        todo += [n for n in map(_needed, requires(name) or []) if n]
    return sorted(found.items())


def download_command(dest: str = ".whl") -> str:
    """The ``pip download`` command that fetches the carry list for CPython 3.12 on manylinux x86_64."""
    platforms = " ".join(f"--platform {p}" for p in PLATFORMS)
    pins = " ".join(f"{n}=={v}" for n, v in carry_list())
    return (
        "python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
        f"{platforms} -d {dest} {pins}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print NAME==VERSION lines instead of the command")
    parser.add_argument("--dest", default=".whl", help="download folder (default .whl, ignored by git)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{n}=={v}" for n, v in carry_list()))
    else:
        print(download_command(args.dest))


if __name__ == "__main__":
    main()
