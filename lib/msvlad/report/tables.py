"""Evaluation and training outputs -> pandas tables for the report notebooks, and table export.

Reads what the pipeline writes (see `msvlad.cli`):
  results/evaluate/<method>/metrics.json              {dataset: {variant: {"mAP", "mP@k", ...}}} (%)
  results/evaluate/<method>/<dataset>/per_query*.csv  query, setup, AP, P@k per query, fractions
  results/evaluate/<method>/<dataset>/ranks.npy       (n_db, n_q) int32, one column per query
  runs/<method>/train/{log,rounds,triplets}.csv       per epoch, per mining round, per mined triplet
AP, mAP and mP@k values returned here are in percent, as in the paper's tables.
Paired bootstrap confidence intervals come from `msvlad.evaluation.stats.paired_bootstrap`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pandas.io.formats.style import Styler

from msvlad import paths
from msvlad.storage import write_text

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

VARIANT_SUFFIX: dict[str, str] = {
    "plain": "",
    "raw": " +raw (unwhitened)",  # the same multi-scale descriptor before PCA-whitening
    "qe": " +QE",
    "dba": " +DBA",
}
SETUP_SHORT: dict[str, str] = {"easy": "E", "medium": "M", "hard": "H", "all": ""}
SETUP_ORDER: tuple[str, ...] = ("easy", "medium", "hard", "all")
MISSING = "–"  # shown for a missing value in markdown / LaTeX tables


# --------------------------------------------------------------------------------------------
# Results tables
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Training logs and miner statistics
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Ground truth of one query (for ranked-list galleries)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def format_cell(value: Any, decimals: int = 2) -> str:
    """One table cell as text: floats with `decimals` places, NaN/None as an en dash."""
    if value is None or (isinstance(value, float | np.floating) and not np.isfinite(value)):
        return MISSING
    if isinstance(value, float | np.floating):
        return f"{value:.{decimals}f}"
    return str(value)


def yes_no(value: Any) -> Any:
    """True / False as "yes" / "no" (what a reader of a report table expects); others unchanged."""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    return value


class ReportStyler(Styler):
    """A pandas Styler whose text form is the table (no memory address in a saved notebook)."""

    def __repr__(self) -> str:
        return self.data.to_string()


def styled(
    table: pd.DataFrame,
    *,
    decimals: int | Mapping[str, int] = 2,
    scientific: Sequence[str] = (),
    index: bool = True,
) -> Any:
    """A table as the HTML reports show it: floats with `decimals` places (columns named in
    `scientific` as 1.00e-04), booleans yes / no, missing values as an en dash, text never cut
    (a pandas Styler whose HTML id is derived from the content; the frame is unchanged).

    decimals: one number for every float column, or {column: decimals} (others get 2).
    """
    places = dict(zip(table.columns, _column_decimals(table.columns, decimals), strict=True))

    def cell(column: Any) -> Any:
        if column in scientific:
            return lambda v: MISSING if not np.isfinite(v) else f"{v:.2e}"
        return lambda v: format_cell(yes_no(v), places[column])

    # the HTML id comes from the content, not a random uuid, so a report is the same bytes each run
    uuid = hashlib.sha1(table.to_csv().encode()).hexdigest()[:10]
    styler = ReportStyler(table, uuid=uuid).format({c: cell(c) for c in table.columns})
    styler = styler.set_table_styles([{"selector": "td", "props": "white-space: nowrap;"}])
    return styler if index else styler.hide(axis="index")


def to_markdown(
    table: pd.DataFrame, *, decimals: int | Mapping[str, int] = 2, index: bool = False
) -> str:
    """GitHub-flavoured markdown table (numbers right-aligned), without the tabulate package.

    decimals: one number for every float column, or {column: decimals} (others get 2).
    """
    frame = table.reset_index() if index else table
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    places = _column_decimals(frame.columns, decimals)
    header = [str(c).replace("|", "\\|") for c in frame.columns]
    body = [
        [format_cell(v, d).replace("|", "\\|") for v, d in zip(row, places, strict=True)]
        for row in frame.itertuples(index=False)
    ]
    widths = [max([len(h), 3, *(len(r[j]) for r in body)]) for j, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if num else c.ljust(w)
                for c, w, num in zip(cells, widths, numeric, strict=True)
            )
            + " |"
        )

    rule = (
        "| "
        + " | ".join(
            ("-" * (w - 1) + ":") if num else "-" * w
            for w, num in zip(widths, numeric, strict=True)
        )
        + " |"
    )
    return "\n".join([line(header), rule, *(line(r) for r in body)]) + "\n"


def to_latex(
    table: pd.DataFrame, *, decimals: int = 2, index: bool = False, caption: str | None = None
) -> str:
    """booktabs `tabular` (in a `table` float when captioned), LaTeX special characters escaped."""
    frame = table.reset_index() if index else table
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    spec = "".join("r" if num else "l" for num in numeric)
    lines = [
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(_tex_escape(str(c)) for c in frame.columns) + r" \\",
        "\\midrule",
    ]
    for row in frame.itertuples(index=False):
        lines.append(" & ".join(_tex_escape(format_cell(v, decimals)) for v in row) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if caption:
        lines = [
            "\\begin{table}",
            "\\centering",
            f"\\caption{{{_tex_escape(caption)}}}",
            *lines,
            "\\end{table}",
        ]
    return "\n".join(lines) + "\n"


def export_table(
    table: pd.DataFrame,
    stem: str,
    tables_dir: str | os.PathLike | None = None,
    *,
    decimals: int = 2,
    index: bool = False,
    caption: str | None = None,
) -> dict[str, Path]:
    """Write `stem`.md, .csv (full precision) and .tex atomically into tables_dir."""
    if not stem or Path(stem).name != stem:
        raise ValueError(f"stem: expected a plain file name, got {stem!r}")
    folder = paths.TABLES if tables_dir is None else Path(tables_dir)
    buf = io.StringIO()
    table.to_csv(buf, index=index)
    out = {
        "md": write_text(folder / f"{stem}.md", to_markdown(table, decimals=decimals, index=index)),
        "csv": write_text(folder / f"{stem}.csv", buf.getvalue()),
        "tex": write_text(
            folder / f"{stem}.tex", to_latex(table, decimals=decimals, index=index, caption=caption)
        ),
    }
    log.info("table %s -> %s", stem, folder)
    return out


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _column_decimals(columns: Sequence[Any], decimals: int | Mapping[str, int]) -> list[int]:
    """Decimals per column: one number for all, or a {column name: decimals} map (default 2)."""
    if isinstance(decimals, Mapping):
        return [int(decimals.get(str(c), 2)) for c in columns]
    return [int(decimals)] * len(columns)


def _tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in text)
