"""How messages name dataset rows: 0-based, said so, so that a user can find the row in their file."""

from __future__ import annotations

_SHOWN_ROWS = 5  # rows listed in a message


def row_ref(row: int) -> str:
    """'row 7 (counting from 0)'."""
    return f"row {row} (counting from 0)"


def more_rows(rows: list[int], what: str, style: str = " (", always: bool = False) -> str:
    """' (3 rows <what>: 1, 4, 7)' (or '; 3 rows ...' with style='; '); empty for a single row unless `always`."""
    if len(rows) <= 1 and not always:
        return ""
    extra = len(rows) - _SHOWN_ROWS
    shown = ", ".join(map(str, rows[:_SHOWN_ROWS])) + (f" and {extra} more" if extra > 0 else "")
    plural = "s" if len(rows) > 1 else ""
    return f"{style}{len(rows)} row{plural} {what}: {shown}{')' if style == ' (' else ''}"
