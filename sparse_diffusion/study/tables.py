"""The report's markdown tables of a study's cells (rows of :func:`.results.cells`), and how a
number is written in every table of the report (:func:`fmt`, :func:`fid_text`).
"""
from __future__ import annotations

import math
from typing import Dict, List

from .results import block_text, label, line_name, main_block


def fmt(value, spec: str = ".3g") -> str:
    """``value`` formatted with ``spec``; "-" for None."""
    return "-" if value is None else format(value, spec)


def fid_text(row: Dict) -> str:
    """A row's FID: mean ± std over its seeds; a single FID has no spread to state."""
    if row["fid"] is None:
        return "-"
    evaluated = sum(f is not None and math.isfinite(f) for f in row["fids"])
    return f"{row['fid']:.1f}" if evaluated < 2 else f"{row['fid']:.1f} ± {row['fid_std']:.1f}"


def markdown_table(rows: List[Dict]) -> str:
    header = ("| method | sparsity (actual) | block | drop | seeds | FID (mean ± std) | parameters | MFLOPs / sample | "
              "s / step | speed-up vs dense | train state (MB) |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [header]
    for r in rows:
        fid = fid_text(r)
        lines.append(
            f"| {label(r)} | {r['sparsity']:.2f} ({r['actual_sparsity']:.2f}) | {block_text(r['block'])} | {fmt(r['drop'], 'g')} | "
            f"{r['seeds']} | {fid} | {r['parameters']:,} | {r['flops'] / 1e6:.1f} | {fmt(r['s_per_step'], '.3f')} | "
            f"{fmt(r['speedup'], '.2f')} | {fmt(r['state_mb'], '.2f')} |"
        )
    return "\n".join(lines)


def headline_table(rows: List[Dict]) -> str:
    """FID (mean ± std over seeds) and training speed-up vs dense, one row per method and
    drop fraction, one column per sparsity, at the main block size."""
    block = main_block(rows)
    sparse = [r for r in rows if r["method"] != "dense" and r["block"] == block]
    sparsities = sorted({r["sparsity"] for r in sparse})
    dense = next((r for r in rows if r["method"] == "dense"), None)

    def cell(r):
        if r is None or r["fid"] is None:
            return "-"
        return f"{fid_text(r)} ({fmt(r['speedup'], '.2f')}x)"

    lines = ["| method | " + " | ".join(f"sparsity {s:g}" for s in sparsities) + " |",
             "| --- |" + " ---: |" * len(sparsities)]
    if dense:
        lines.append(f"| {label(dense)} | " + " | ".join(cell(dense) for _ in sparsities) + " |")
    names = dict.fromkeys(line_name(r) for r in sparse)
    for name in names:
        by_sparsity = {r["sparsity"]: r for r in sparse if line_name(r) == name}
        lines.append(f"| {name} | " + " | ".join(cell(by_sparsity.get(s)) for s in sparsities) + " |")
    return "\n".join(lines)
