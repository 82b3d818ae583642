"""The HTML page's pieces, each laid out from the report model (``rankscope.report.model``): tables of typed
cells, checkpoint cards, the composition and comparison sections, the per-layer details. Nothing here computes
a value; every string from a checkpoint goes through :func:`esc`."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

from ..model import Cell, CheckpointView, ComparisonView, CompositionView, FigureSpec, Kpi, LayerDetail, Note, Shares
from ..model import Table as TableModel
from ..tables import alignment_summary
from .svg import colour, inline_svg, key_svg, layer_svg

_MAX_SKIPPED = 200  # skipped tensors listed on the page; summary.json has them all
_TALL = 40  # tables with more rows scroll in a box of their own


def esc(value: object) -> str:
    """Checkpoint-provided text as HTML text or attribute value."""
    return html.escape(str(value), quote=True)


def wrappable(value: object) -> str:
    """A layer name that may break after its dots (long module paths in narrow columns)."""
    return esc(value).replace(".", ".<wbr>")


def math_text(text: str) -> str:
    """Text with norms (column titles, captions, definitions): ``‖ΔW‖_F`` with its subscript, the rest escaped."""
    return esc(text).replace("‖_F", "‖<sub>F</sub>")


def bar(shares: Shares) -> str:
    """Shares as one stacked bar (|x_i| / Σ|x|), each component in its palette colour."""
    magnitudes = [abs(v) if v is not None else 0.0 for v in shares.values]
    total = sum(magnitudes)
    if total <= 0:
        return "—"
    segments = "".join(
        f'<span style="width:{100 * size / total:.2f}%;background:{colour(i)}" '
        f'title="{esc(name)}: {shares.what} {Cell(value, ".3g").text}"></span>'
        for i, (value, name, size) in enumerate(zip(shares.values, shares.names, magnitudes, strict=True))
    )
    return f'<div class="bar">{segments}</div>'


def td(cell: Cell, *, anchor: str | None = None, name: bool = False) -> str:
    """A cell: numbers right-aligned and sorted by their exact value (``data-v``); a layer name linked to its
    detail; shares as a bar."""
    if isinstance(cell.value, Shares):
        return f"<td>{bar(cell.value)}</td>"
    if cell.numeric:
        sort = "" if cell.value is None else f' data-v="{cell.value!r}"'
        return f'<td class="n"{sort}>{esc(cell.text)}</td>'
    if name:
        text = wrappable(cell.text)
        linked = f'<a href="#{anchor}">{text}</a>' if anchor else text
        return f'<td class="name">{linked}</td>'
    if cell.text in ("ok", "invalid", "approximate", "zero"):
        return f'<td class="{cell.text}">{cell.text}</td>'
    return f"<td>{esc(cell.text)}</td>"


def table(model: TableModel, *, anchors: Mapping[str, str] | None = None, caption: str | None = None) -> str:
    """A sortable table; a long one scrolls in its own box under a header that stays put."""
    names = [i for i, c in enumerate(model.columns) if c.title == "layer"]
    head = "".join(
        f'<th scope="col" data-type="{"num" if c.numeric else "text"}" tabindex="0">{math_text(c.title)}</th>'
        for c in model.columns
    )
    rows = []
    for row in model.rows:
        anchor = (anchors or {}).get(row.layer or "")
        cells = "".join(td(cell, anchor=anchor, name=i in names) for i, cell in enumerate(row.cells))
        attrs = (' class="total"' if row.total else "") + (f' data-search="{esc(row.search)}"' if row.search else "")
        rows.append(f"<tr{attrs}>{cells}</tr>")
    text = caption if caption is not None else model.caption
    cap = f"<caption>{esc(text)}</caption>" if text else ""
    box = "scroll tall" if len(rows) > _TALL else "scroll"
    return (
        f'<div class="{box}"><table class="sortable" id="{esc(model.id)}">{cap}<thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def filter_box(table_id: str, placeholder: str, total: int) -> str:
    return (
        f'<div class="filter"><input type="search" data-filter="{table_id}" placeholder="{placeholder}" '
        f'aria-label="{placeholder}"><span class="count" data-count="{table_id}">{total} rows</span></div>'
    )


def kpis(items: Sequence[Kpi]) -> str:
    def one(k: Kpi) -> str:
        sub = f"<small>{esc(k.detail)}</small>" if k.detail else ""
        return f'<div class="kpi"><b>{esc(k.value.text)}</b><span>{esc(k.label)}</span>{sub}</div>'

    return '<div class="kpis">' + "".join(one(k) for k in items) + "</div>"


def figure(spec: FigureSpec, svg: str, number: int, formats: Sequence[str]) -> str:
    links = " · ".join(f'<a href="figures/{esc(spec.id)}.{fmt}">{fmt.upper()}</a>' for fmt in formats)
    links = f' <span class="dl">{links}</span>' if links else ""
    cls = "fig wide" if spec.wide else "fig"
    return (
        f'<figure class="{cls}">{inline_svg(svg, f"f{number}-", spec.caption)}'
        f"<figcaption>{math_text(spec.caption)}{links}</figcaption></figure>"
    )


def note(n: Note, label: str | None = None) -> str:
    """A note, prefixed with its checkpoint's label (``label``) where the report has several."""
    about = f"<b>{esc(label)}</b>: " if label else ""
    if n.level == "invalid":
        return f'<p class="warn">⚠ {about}layer <code>{esc(n.layer)}</code> is invalid: {esc(n.text)}</p>'
    if n.level == "warning":
        return f'<p class="warn">⚠ {about}{esc(n.text)}</p>'
    return f'<p class="note">{about}{esc(n.text)}</p>'


def checkpoint_card(view: CheckpointView, several: bool) -> str:
    title = f"<h3>{esc(view.label)}</h3>" if several else ""
    parts = [
        f'<div class="card">{title}<p class="meta"><code>{esc(view.path)}</code> · {esc(view.adapter_type)} '
        f"({esc(view.family)}) · singular values of {esc(view.scaling)} · {esc(view.exactness)}</p>",
        kpis(view.kpis),
    ]
    if view.usage is not None:
        util, (low, low_u), (high, high_u) = view.usage
        parts.append(
            f'<p class="headline">Layers use {util:.0%} of their rank bound on average (erank / rank bound); '
            f"<b>{esc(low)}</b> uses the least ({low_u:.0%}), <b>{esc(high)}</b> the most ({high_u:.0%}).</p>"
        )
    parts += [note(n, view.label if several else None) for n in view.notes]
    if view.skipped:
        items = "".join(f"<li><code>{esc(k)}</code> — {esc(r)}</li>" for k, r in view.skipped[:_MAX_SKIPPED])
        more = len(view.skipped) - _MAX_SKIPPED
        items += f"<li>… and {more} more (summary.json)</li>" if more > 0 else ""
        parts.append(
            f"<details><summary>{len(view.skipped)} stored tensors not used</summary><ul>{items}</ul></details>"
        )
    if view.config:
        rows = "".join(f"<tr><th>{esc(k)}</th><td><code>{esc(v)}</code></td></tr>" for k, v in view.config)
        parts.append(
            f'<details class="config"><summary>Configuration</summary><table class="kv">{rows}</table></details>'
        )
    return "".join(parts) + "</div>"


def _plain(model: TableModel, caption: str, cls: str = "plain") -> str:
    head = "".join(f"<th>{esc(c.title)}</th>" for c in model.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(c.text)}</td>" if not c.numeric else td(c) for c in r.cells) + "</tr>"
        for r in model.rows
    )
    head = f"<caption>{esc(caption)}</caption><thead><tr>{head}</tr></thead>"
    return f'<table class="{cls}">{head}<tbody>{rows}</tbody></table>'


def _matrix(model: TableModel) -> str:
    """A k×k matrix as a small heatmap table (|value| sets the shade of the first palette colour)."""
    red, green, blue = (int(colour(0)[i : i + 2], 16) for i in (1, 3, 5))
    head = "".join(f"<th>{esc(c.title)}</th>" for c in model.columns)
    rows = []
    for row in model.rows:
        cells = []
        for cell in row.cells:
            shade = 0 if cell.value is None else min(1.0, abs(cell.value))  # type: ignore[arg-type]
            cells.append(
                f'<td style="background:rgba({red},{green},{blue},{shade * 0.8:.2f});'
                f'color:{"#fff" if shade > 0.55 else "inherit"}">{esc(cell.text)}</td>'
            )
        rows.append(f"<tr><th>{esc(row.layer)}</th>{''.join(cells)}</tr>")
    return (
        f'<table class="matrix"><caption>{esc(model.caption)}</caption><thead><tr><th></th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def detail(item: LayerDetail, several: bool, thresholds: Sequence[float], energies: Sequence[float]) -> str:
    """One layer (in every checkpoint that has it): key numbers, components, and the two-panel SVG."""
    facts = []
    for entry in item.entries:
        record = entry.record
        who = f"{key_svg(entry.style)}{esc(entry.label)}: " if several else ""
        if not record.valid:
            facts.append(f'<p class="warn">{who}invalid — {esc(record.error)}</p>')
            continue
        m = record.metrics or {}
        counts = ", ".join(f"{v} above {float(k):g}" for k, v in m["count_above"].items())
        energy = ", ".join(f"{float(k):.0%}: {v}" for k, v in m["energy_rank"].items())
        scale = f" · scale {Cell(record.scale, '.4g').text}" if record.scale is not None else ""
        facts.append(
            f"<p>{who}{'×'.join(map(str, record.matrix_shape))} · r≤{record.rank_bound}{scale} · "
            f"{'exact' if record.exact else 'approximate'} · σ₁ {Cell(m['sigma_max'], '.4g').text} · "
            f"‖ΔW‖<sub>F</sub> {Cell(m['frobenius'], '.4g').text} · σ: {counts} · erank {Cell(m['erank'], '.2f').text}"
            f" · stable rank {Cell(m['stable_rank'], '.2f').text} · numerical rank {m['numerical_rank']} · "
            f"energy rank {energy}</p>"
        )
        if entry.components is not None:
            of = f"Components ({entry.label})" if several else "Components"
            matrix = _matrix(entry.cosine) if entry.cosine is not None else ""
            facts.append(f'<div class="row">{_plain(entry.components, of)}{matrix}</div>')
    plot = layer_svg(item.series, thresholds, energies, shared_frame=True)
    return (
        f'<details class="layer" id="{item.anchor}"><summary><code>{esc(item.name)}</code></summary>'
        f'<div class="facts">{"".join(facts)}</div>{plot}</details>'
    )


def composition_block(view: CompositionView, several: bool) -> str:
    legend = "".join(
        f'<span class="key"><span class="dot" style="background:{colour(i)}"></span>{esc(n)}</span>'
        for i, n in enumerate(view.components)
    )
    title = f"<h3>Composition — {esc(view.label)}</h3>" if several else ""
    return f'{title}{kpis(view.kpis)}<p class="legend">{legend}</p>' + table(view.table)


def comparison_body(view: ComparisonView) -> str:
    headlines = "".join(f"<li>{esc(line)}</li>" for line in view.headlines)
    a = alignment_summary(view.alignment)
    aligned = ""
    if a is not None:
        aligned = (
            f"<p>Across checkpoints (mean over matched layers and pairs): update cosine {a['mean_cosine']}; "
            f"left-subspace overlap {a['mean_left_overlap']} (random {a['mean_left_baseline']}); right-subspace "
            f"overlap {a['mean_right_overlap']} (random {a['mean_right_baseline']}).</p>"
        )
    unmatched = "".join(
        f'<p class="note">Only in {esc(label)}: {len(names)} layers ('
        f"{', '.join(esc(n) for n in names[:5])}{', …' if len(names) > 5 else ''})</p>"
        for label, names in view.unmatched.items()
    )
    return f'<ul class="headlines">{headlines}</ul>{aligned}{unmatched}{table(view.modules)}'
