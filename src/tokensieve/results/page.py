"""The interactive report page: ``tokensieve report STORE --format html``.

One self-contained HTML file that works offline: the JavaScript of `Plotly <https://plotly.com/javascript/>`_ is
inlined (no CDN, no network), with the page's own script (``page.js``) and style (``page.css``) and the report's data
as one compact JSON (:mod:`.page_data`, aggregated in Python). Below the interactive sections the page carries the
static report — every table and PNG figure of the Markdown report, embedded — so nothing is lost and a reader without
JavaScript still has the whole report.

Plotly's JavaScript comes from the ``plotly`` package on PyPI (``plotly/package_data/plotly.min.js``, read through
``plotly.offline.get_plotlyjs``), the optional extra ``tokensieve[report]``; it is imported only here, when an HTML
page is asked for, so the Markdown report and its PNG plots need nothing but matplotlib.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from ..errors import ConfigError
from .page_data import to_json
from .render import Block, html_blocks

EXTRA = "report"  # pip install 'tokensieve[report]'


def plotly_js() -> str:
    """Plotly's minified JavaScript from the ``plotly`` package; a :class:`ConfigError` naming the extra without it."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise ConfigError(
            f"The interactive HTML report inlines Plotly's JavaScript, which comes with the optional extra: "
            f"pip install 'tokensieve[{EXTRA}]' (or pip install plotly). The Markdown report (--format md) needs "
            "nothing more."
        ) from None
    return str(get_plotlyjs())


def _asset(name: str) -> str:
    return (resources.files(__package__) / name).read_text(encoding="utf-8")


def static_part(blocks: Sequence[Block]) -> str:
    """The static report (every block but the title) in collapsed sections, one per ``h2``."""
    parts = [
        '<section id="tables"><h2>All tables and figures</h2><p class="note">The static report: the tables and PNG '
        "figures of the Markdown report (<code>--format md</code>), one collapsed section each.</p>"
    ]
    open_ = False
    intro: list[Block] = []
    for b in blocks:
        if b.kind == "h1":
            continue
        if b.kind == "h2":
            if open_:
                parts.append("</details>")
            parts.append(f"<details><summary>{html.escape(b.text)}</summary>")
            open_ = True
        elif open_:
            parts += html_blocks([b])
        else:
            intro.append(b)
    if open_:
        parts.append("</details>")
    if intro:  # the provenance paragraphs before the first section
        parts.insert(1, "<details><summary>Provenance</summary>" + "".join(html_blocks(intro)) + "</details>")
    parts.append("</section>")
    return "\n".join(parts)


def render_page(data: Mapping[str, Any], blocks: Sequence[Block], title: str) -> str:
    """The page: Plotly, the page's style and script, the data, the static report."""
    js = plotly_js()
    return "\n".join([
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="generator" content="tokensieve report">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_asset('page.css')}</style>",
        # errors of any script are kept for the browser test (and a curious reader's console)
        "<script>window.__errors=[];window.addEventListener('error',function(e){window.__errors.push(String("
        "e.message))});window.PlotlyConfig={MathJaxConfig:'local'};</script>",
        f"<script>{js}</script>",
        "</head><body>",
        f'<header class="top"><h1>{html.escape(title)}</h1><nav id="nav"></nav></header>',
        '<div class="layout"><aside id="picker"></aside><main id="main"><div id="summary"></div></main></div>',
        static_part(blocks),
        f'<script type="application/json" id="report-data">{to_json(data)}</script>',
        f"<script>{_asset('page.js')}</script>",
        "</body></html>",
    ])  # fmt: skip


__all__ = ["EXTRA", "plotly_js", "render_page", "static_part"]
