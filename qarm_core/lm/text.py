"""Item text as every model reads it (judge, QA, embedding LLM, MiniLM): rendered from item fields,
sanitised and delimited.

Item titles and descriptions are written by sellers, so they are untrusted: ``sanitize`` removes
control characters, chat/special-token markup (``<|...|>``, ``<s>``), angle brackets and the quote
character used as delimiter, collapses whitespace and bounds the length. The judge prompts then
put every item text inside double quotes, so an item text can never close its own field or open a
new turn. The likelihood scorer never asks the model a yes/no question at all: an instruction
inside a title has no answer slot to hijack (measured: see ``evaluate.injection_flip_rate``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa

from qarm_core.errors import DataError

_SPECIAL = re.compile(r"<\|[^|>]{0,40}\|?>|</?s>|\[/?INST\]|<<SYS>>|<</SYS>>", re.IGNORECASE)
_CTRL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")
_WS = re.compile(r"\s+")
_ARTICLE = re.compile(r"^(?P<rest>.+), (?P<art>The|A|An|Les|La|Le|L'|Il|El|Die|Das|Der)"
                      r"(?P<tail> \(.*\))?$")


@dataclass(frozen=True)
class ItemTextFormat:
    """How an item row becomes one line of text, e.g. ``The Usual Suspects (1995), genres: Crime, Thriller``."""

    max_title_chars: int = 100
    max_tags: int = 6
    max_description_chars: int = 0       # 0: descriptions are left out
    include_year: bool = True
    include_tags: bool = True
    tags_label: str = "genres"
    uninvert_articles: bool = True       # "Usual Suspects, The" -> "The Usual Suspects"
    # Tags before the title: "Crime, Thriller film: The Usual Suspects (1995)" (kind_noun = "film").
    tags_first: bool = False
    kind_noun: str = "film"


def sanitize(text: Any, max_chars: int) -> str:
    """Untrusted text -> one safe line of at most ``max_chars`` characters (may be empty)."""
    if text is None:
        return ""
    s = unicodedata.normalize("NFKC", str(text))
    s = _SPECIAL.sub(" ", s)
    s = _CTRL.sub(" ", s)
    s = s.replace('"', "'").replace("<", " ").replace(">", " ").replace("`", "'")
    s = _WS.sub(" ", s).strip()
    if len(s) > max_chars:
        s = s[:max_chars].rstrip() + "..."
    return s


def uninvert(title: str) -> str:
    """``"Usual Suspects, The (1995)"`` -> ``"The Usual Suspects (1995)"``; other titles unchanged."""
    m = _ARTICLE.match(title)
    if not m:
        return title
    art = m.group("art")
    sep = "" if art.endswith("'") else " "
    return f"{art}{sep}{m.group('rest')}{m.group('tail') or ''}"


def render_item(row: Mapping[str, Any], fmt: ItemTextFormat | None = None) -> str:
    """One item row (keys title, year?, tags?, description?) -> its sanitised one-line text."""
    f = fmt or ItemTextFormat()
    title = sanitize(row.get("title"), f.max_title_chars)
    if f.uninvert_articles:
        title = uninvert(title)
    text = title or "untitled"
    year = row.get("year")
    if f.include_year and year is not None:
        text += f" ({int(year)})"
    tags = [sanitize(t, 40) for t in (row.get("tags") or [])][: f.max_tags]
    tags = [t for t in tags if t]
    if f.include_tags and tags:
        if f.tags_first:
            text = f"{', '.join(tags)} {f.kind_noun}: {text}"
        else:
            text += f", {f.tags_label}: " + ", ".join(tags)
    if f.max_description_chars > 0:
        desc = sanitize(row.get("description"), f.max_description_chars)
        if desc:
            text += f". {desc}"
    return text


def render_tags(row: Mapping[str, Any], fmt: ItemTextFormat | None = None) -> str:
    """The item's sanitised tags as one line, e.g. ``Crime, Thriller``; empty if it has none."""
    f = fmt or ItemTextFormat()
    tags = [sanitize(t, 40) for t in (row.get("tags") or [])][: f.max_tags]
    return ", ".join(t for t in tags if t)


def _wanted_rows(items: pa.Table, item_ids: Iterable[int], dataset: str, stage: str) -> tuple[set[int], list[dict]]:
    """The wanted ids and the rows of ``items`` that hold them, as dicts (only those rows become
    Python objects: a day's few new items in a 1M-item catalog cost a vectorised filter, not 1M dicts)."""
    import pyarrow.compute as pc

    if "item_id" not in items.column_names or "title" not in items.column_names:
        raise DataError(stage, dataset, "items table needs columns item_id and title, has "
                                        f"{items.column_names}")
    wanted = set(int(i) for i in item_ids)
    cols = [c for c in ("item_id", "title", "year", "tags", "description") if c in items.column_names]
    table = items.select(cols)
    if len(wanted) < table.num_rows:
        try:
            mask = pc.is_in(pc.cast(table["item_id"], pa.int64()), value_set=pa.array(sorted(wanted), pa.int64()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OverflowError):
            mask = None                         # ids that are not int64: rows are matched one by one below
        if mask is not None:
            table = table.filter(mask)
    return wanted, table.to_pylist()


def render_items(items: pa.Table, item_ids: Iterable[int], fmt: ItemTextFormat | None = None,
                 dataset: str = "items", tags_only: bool = False, stage: str = "judge") -> dict[int, str]:
    """``{item_id: text}`` (or ``{item_id: tags line}`` with ``tags_only``) for the wanted ids;
    a wanted id absent from ``items`` is a DataError of ``stage``."""
    texts, tags = render_texts_and_tags(items, item_ids, fmt, dataset, stage, tags=tags_only, texts=not tags_only)
    return tags if tags_only else texts


def render_texts_and_tags(items: pa.Table, item_ids: Iterable[int], fmt: ItemTextFormat | None = None,
                          dataset: str = "items", stage: str = "judge", texts: bool = True,
                          tags: bool = True) -> tuple[dict[int, str], dict[int, str]]:
    """``({item_id: text}, {item_id: tags line})`` for the wanted ids in one pass over ``items``
    (either dict left empty when not asked for); a wanted id absent from ``items`` is a DataError of
    ``stage``. The first row of an id that appears twice wins."""
    wanted, rows = _wanted_rows(items, item_ids, dataset, stage)
    text_of: dict[int, str] = {}
    tags_of: dict[int, str] = {}
    seen: set[int] = set()
    for row in rows:
        iid = row["item_id"]
        if iid in wanted and iid not in seen:
            seen.add(iid)
            if texts:
                text_of[iid] = render_item(row, fmt)
            if tags:
                tags_of[iid] = render_tags(row, fmt)
    missing = wanted - seen
    if missing:
        raise DataError(stage, dataset, f"{len(missing)} item(s) referenced by pairs are not in the "
                                        f"items table, e.g. {sorted(missing)[:5]}")
    return text_of, tags_of


def quote(text: str) -> str:
    """The delimiter every prompt puts around item text (``sanitize`` removed inner quotes)."""
    return f'"{text}"'


def item_text(items: pa.Table, fmt: ItemTextFormat | None = None) -> tuple[np.ndarray, list[str]]:
    """(sorted item ids ``(n,)``, one rendered line per item, e.g. ``Heat (1995), genres: Action, Crime``)."""
    cols = [c for c in ("item_id", "title", "year", "tags", "description") if c in items.column_names]
    rows = sorted(items.select(cols).to_pylist(), key=lambda r: r["item_id"])
    return np.array([r["item_id"] for r in rows], np.int64), [render_item(r, fmt) for r in rows]
