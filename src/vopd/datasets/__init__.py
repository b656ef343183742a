"""Dataset readers and writers beyond our own JSONL format (see ``docs/data.md``).

:func:`load_records` (the same function as :func:`vopd.records.load_records`) reads our JSONL
format and every layout below, which importing this package registers; import the readers and
writers from here to call them directly.
"""

from vopd.datasets.visionopd6k import (
    is_visionopd6k_row,
    parse_problem,
    parse_visionopd6k_row,
    write_visionopd6k,
)
from vopd.records import load_records

__all__ = ["load_records", "is_visionopd6k_row", "parse_problem", "parse_visionopd6k_row", "write_visionopd6k"]
