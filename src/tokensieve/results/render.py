"""Rendering: a report is a list of :class:`Block` (headings, paragraphs, code, tables, images) written as Markdown,
as HTML fragments (images embedded; the interactive page, :mod:`.page`, carries them as its static part) or, for
tables, as aligned text for a terminal."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Block:
    kind: str  # "h1", "h2", "h3", "p", "table", "image", "code"
    text: str = ""
    header: Sequence[str] = ()
    body: Sequence[Sequence[str]] = ()
    path: Path | None = None


def fmt(x: Any, digits: int = 2, pct: bool = False) -> str:
    """A number for a table cell; ``—`` for a missing value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.0%}" if pct else f"{x:.{digits}f}"


def cell(x: Any, spec: str) -> str:
    """A value formatted with a format spec (``.2f``, ``.1%``, ``d``, ``s``); ``—`` for a missing value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(x, spec)


def score_text(metric: str, x: float, err: float = math.nan, lo: float = math.nan, hi: float = math.nan) -> str:
    """A score with its 95 % interval ``[lo–hi]`` when given, else ``± err`` (standard error) when given."""
    if math.isnan(x):
        return "—"
    if metric == "perplexity":
        return f"{x:.2f}"
    if not (math.isnan(lo) or math.isnan(hi)):
        return f"{x:.2f} [{lo:.2f}–{hi:.2f}]"
    return f"{x:.2f}" + (f" ± {err:.2f}" if not math.isnan(err) else "")


def text_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns for a terminal."""
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def render_markdown(blocks: list[Block], out: Path) -> str:
    """Markdown; images are linked relative to ``out``."""
    lines: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "code":
            lines += ["```bash", b.text, "```", ""]
        elif b.kind == "table":
            lines.append("| " + " | ".join(b.header) + " |")
            lines.append("|" + "|".join("---" for _ in b.header) + "|")
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in b.body]
            lines.append("")
        elif b.kind == "image" and b.path is not None:
            lines += [f"![{b.text}]({b.path.relative_to(out).as_posix()})", ""]
    return "\n".join(lines)


def html_blocks(blocks: Sequence[Block], *, images: bool = True) -> list[str]:
    """The HTML of each block (escaped; `code`, **bold** and *italic* in paragraphs); images embedded as data URIs,
    or left out with ``images=False``."""
    parts: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            parts.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            text = html.escape(b.text)
            text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
            text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
            text = re.sub(r"\*([^*]+)\*", r"<i>\1</i>", text)
            parts.append(f"<p>{text}</p>")
        elif b.kind == "code":
            parts.append(f"<pre>{html.escape(b.text)}</pre>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b.body)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif b.kind == "image" and b.path is not None and images:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            parts.append(f"<p><img alt='{html.escape(b.text)}' src='data:image/png;base64,{data}'></p>")
    return parts


def slug(text: str) -> str:
    """A file-name-safe form of a label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
