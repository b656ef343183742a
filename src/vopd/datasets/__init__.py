"""Dataset readers and writers beyond our own JSONL format (see ``docs/data.md``).

:func:`vopd.records.load_records` detects the layouts below by itself; import from here to
call a reader or writer directly.
"""

from vopd.datasets.visionopd6k import (
    is_visionopd6k_row,
    parse_problem,
    parse_visionopd6k_row,
    write_visionopd6k,
)

__all__ = ["is_visionopd6k_row", "parse_problem", "parse_visionopd6k_row", "write_visionopd6k"]
