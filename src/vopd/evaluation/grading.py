"""Rule-based grading; lives in :mod:`vopd.grading` (a core module the trainer's health probe
uses too) and is re-exported here, where the evaluation package has always imported it from."""

from vopd.grading import (  # noqa: F401
    LETTERS,
    Verdict,
    __all__,
    answer_span,
    extract_choice,
    extract_yes_no,
    grade,
    grade_choice,
    grade_open,
    grade_yes_no,
    normalize_text,
)
