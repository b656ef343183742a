"""``vopd data check``: find, before training, every row ``vopd train`` would reject or skip.

Always: every row parses, every image (and ``teacher_image``) file opens and its header is
sane (size, pixel budget), every box fits its image - what `vopd.data.load_train_samples`
checks. ``decode=True`` also decodes every image fully and builds both views (a truncated file
whose header reads fine fails only here, or mid-run). With a model (``model=...``) every prompt
is built with its processor and measured against ``max_prompt_tokens``. Each problem is named
``file:row``; the check fails (exit 1) when any row is unusable, and when no row is (an empty
file: the same "no usable records" error ``vopd train`` stops with).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vopd.config import ViewConfig
from vopd.datasets import load_records
from vopd.images import ImageError
from vopd.models import build_prompts
from vopd.records import Issue, RecordError
from vopd.views import make_views, missing_evidence

__all__ = ["DataCheck", "check_data"]


@dataclass
class DataCheck:
    """What `check_data` found: usable rows and one ``Issue`` (file:row: reason) per bad row."""

    source: Path
    rows: int  # rows read (non-blank lines)
    usable: int
    problems: list[Issue] = field(default_factory=list)
    clipped: list[Issue] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # what was checked, for the report

    @property
    def ok(self) -> bool:
        """Every row usable, and at least one (training refuses a file without a usable row)."""
        return not self.problems and self.usable > 0

    def report(self, limit: int = 50) -> str:
        head = (
            f"{self.source}: {self.usable} of {self.rows} rows usable "
            f"({', '.join(self.checked)}); {len(self.problems)} unusable, {len(self.clipped)} boxes clipped"
        )
        lines = [head, *(f"  unusable: {p}" for p in self.problems[:limit])]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more unusable rows")
        lines += [f"  clipped: {c}" for c in self.clipped[:limit]]
        return "\n".join(lines)


def check_data(
    path: str | Path,
    *,
    views: ViewConfig | None = None,
    out_of_bounds: str = "clip",
    decode: bool = False,
    processor: Any = None,
    max_prompt_tokens: int | None = None,
    thinking: bool | None = None,
) -> DataCheck:
    """Check a record file as training would (see the module docstring); never raises for a bad row.

    Raises:
        RecordError: the file itself cannot be found or read.
    """
    views = views or ViewConfig()
    loaded = load_records(path, out_of_bounds=out_of_bounds, on_error="skip", check_images=True, allow_empty=True)
    checked = ["rows parsed", "image headers read", f"boxes inside images (out_of_bounds={out_of_bounds})"]
    problems = list(loaded.skipped)
    usable = 0
    if decode or processor is not None:
        checked.append("images decoded, views built")
    if processor is not None:
        checked.append(f"prompts measured with the processor (max_prompt_tokens={max_prompt_tokens})")
    crop_source = getattr(views, "crop_source", "box")
    for sample, row in zip(loaded.samples, loaded.rows):
        try:
            missing = missing_evidence(sample, views) if crop_source == "box" else None
            if missing:  # what make_views refuses in training, found without decoding
                raise RecordError(missing, field="boxes")
            if decode or processor is not None:
                student, teacher, text = make_views(sample, views)
                if processor is not None and max_prompt_tokens:
                    for name, image in (("student", student), ("teacher", teacher)):
                        n = int(build_prompts(processor, [image], [text], thinking=thinking)["attention_mask"].sum())
                        if n > max_prompt_tokens:
                            raise RecordError(
                                f"the {name} prompt has {n} tokens, over max_prompt_tokens={max_prompt_tokens}"
                            )
        except (RecordError, ImageError) as err:
            reason = err.reason if isinstance(err, RecordError) else str(err)
            problems.append(Issue(str(loaded.source), row, reason))
            continue
        usable += 1
    problems.sort(key=lambda p: p.row)
    return DataCheck(
        loaded.source, len(loaded.samples) + len(loaded.skipped), usable, problems, list(loaded.clipped), checked
    )
