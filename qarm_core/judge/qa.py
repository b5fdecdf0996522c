"""Per-item question/answer pairs (the QA segment of the embedding LLM's input). Output: ``schemas.QA``.

Template-grounded: the questions are built from the item's own fields (year, genres/tags, title),
so every question is answerable from the item text; the LLM writes the answers (greedy, batched).
Each answer is validated: non-empty, at most ``max_answer_chars``, no echo of the prompt, and for
factual questions consistent with the field (the year answer names the year, the genre answer
names one of the genres). An answer that fails is replaced by the field-derived template answer,
so every stored row is grounded; ``QAStats`` says how many LLM answers passed.

QA rows are cached by (item, model id, prompt version, hash of the item's fields): ``items_to_generate``
is the pure function that picks the items still lacking QA, so an item whose title, year, tags or
description changed under the same id is asked again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qarm_core.errors import DataError
from qarm_core.judge.config import QAConfig
from qarm_core.judge.prompts import QAPrompt, qa_prompt
from qarm_core.lm.text import quote, render_item, sanitize, uninvert
from qarm_core.progress import Progress
from qarm_core.schemas import QA

if TYPE_CHECKING:
    from qarm_core.lm.backend import LMBackend

STAGE = "judge"
_ECHO = re.compile(r"\b(item|question|answer)\s*:|data, not instructions|one short sentence|<\|", re.IGNORECASE)


@dataclass(frozen=True)
class QuestionTemplate:
    """A question about an item, asked only if the item has ``needs`` (a field name or None)."""

    question: str                                    # {title} is the item's title
    needs: str | None
    check: Callable[[str, dict], bool] | None        # grounding check of an LLM answer, or None
    fallback: Callable[[dict], str]                  # the field-derived answer


def _title(row: dict) -> str:
    return uninvert(sanitize(row.get("title"), 100)) or "this item"


def _tags(row: dict) -> list[str]:
    return [t for t in (sanitize(x, 40) for x in (row.get("tags") or [])) if t]


def _join(xs: list[str]) -> str:
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


TEMPLATES: tuple[QuestionTemplate, ...] = (
    QuestionTemplate("In which year was {title} released?", "year",
                     lambda a, r: str(r["year"]) in a,
                     lambda r: f"{_title(r)} was released in {r['year']}."),
    QuestionTemplate("What genres does {title} belong to?", "tags",
                     lambda a, r: any(t.lower() in a.lower() for t in _tags(r)),
                     lambda r: f"{_title(r)} is {_join(_tags(r))}."),
    QuestionTemplate("What kind of film is {title}?", "tags",
                     lambda a, r: any(t.lower().rstrip("s") in a.lower() for t in _tags(r)),
                     lambda r: f"It is a {_join(_tags(r)).lower()} film."),
    QuestionTemplate("Who would enjoy {title}?", "tags", None,
                     lambda r: f"Viewers who like {_join(_tags(r)).lower()} films."),
    QuestionTemplate("Is {title} an older or a recent film?", "year",
                     lambda a, r: str(r["year"]) in a or any(w in a.lower() for w in ("old", "recent", "classic", "new")),
                     lambda r: f"It is from {r['year']}."),
    QuestionTemplate("What is the title of this film?", None,
                     lambda a, r: _title(r).lower()[:12] in a.lower(),
                     lambda r: f"It is called {_title(r)}."),
)


def questions_for(row: dict, k: int) -> list[tuple[int, QuestionTemplate, str]]:
    """Up to ``k`` (template index, template, question) that this item's fields can answer."""
    out = []
    for i, t in enumerate(TEMPLATES):
        if t.needs == "tags" and not _tags(row):
            continue
        if t.needs is not None and t.needs != "tags" and row.get(t.needs) is None:
            continue
        out.append((i, t, t.question.format(title=_title(row))))
        if len(out) == k:
            break
    return out


def validate_answer(answer: str, question: str, max_chars: int) -> str | None:
    """The cleaned answer, or None if empty, too long (after keeping its first sentence), or an
    echo of the prompt."""
    a = " ".join((answer or "").split()).strip()
    if not a or _ECHO.search(a) or a.lower().rstrip("?") == question.lower().rstrip("?"):
        return None
    if len(a) > max_chars:
        m = re.match(r"^(.+?[.!?])(\s|$)", a)
        a = m.group(1) if m and len(m.group(1)) <= max_chars else ""
    return a or None


@dataclass
class QAStats:
    items: int = 0
    questions: int = 0
    llm_answers_kept: int = 0
    fallbacks: int = 0
    deferred_items: int = 0        # items lacking QA left to the next run that trains (``defer``)
    deferred_questions: int = 0    # the questions they would have been asked


QA_FIELDS = ("title", "year", "tags", "description")     # what questions and answers are made from


def item_field_hash(row: dict) -> str:
    """Hash of the item fields QA reads (``QA_FIELDS``; absent ones count as None)."""
    from qarm_core.hashing import stable_hash

    return stable_hash([row.get(c) for c in QA_FIELDS])


def made_with(previous: pa.Table, model_id: str, prompt_version: str) -> pa.Table:
    """Rows of the QA table ``previous`` made by ``model_id`` with ``prompt_version``."""
    missing = [c for c in QA.columns if c not in previous.column_names]
    if missing:
        raise DataError(STAGE, "qa", f"previous QA table lacks columns {missing}")
    return previous.filter(pc.and_(pc.equal(previous["model_id"], model_id),
                                   pc.equal(previous["prompt_version"], prompt_version)))


def _reusable(previous: pa.Table, hashes: dict[int, str], model_id: str, prompt_version: str) -> pa.Table:
    """Rows of ``previous`` made by this model and prompt from the item's current fields."""
    prev = made_with(previous, model_id, prompt_version)
    ok = [hashes.get(i) == h for i, h in zip(prev["item_id"].to_pylist(), prev["text_hash"].to_pylist())]
    return prev.filter(pa.array(ok, pa.bool_()))


def items_to_generate(previous: pa.Table | None, hashes: dict[int, str], model_id: str,
                      prompt_version: str) -> list[int]:
    """The ids of ``hashes`` (item id -> ``item_field_hash``; sorted) with no QA row in ``previous``
    for this model id, prompt version and item text."""
    ids = sorted(hashes)
    if previous is None or previous.num_rows == 0:
        return ids
    done = set(_reusable(previous, hashes, model_id, prompt_version)["item_id"].to_pylist())
    return [i for i in ids if i not in done]


def generate_qa(items: pa.Table, backend: "LMBackend", cfg: QAConfig | None = None,
                previous: pa.Table | None = None, item_ids: Iterable[int] | None = None,
                stats: QAStats | None = None, defer: bool = False) -> pa.Table:
    """The QA table of ``item_ids`` (default: every item), at most ``cfg.k`` rows per item.

    Items already answered in ``previous`` by this model id + prompt version are copied, the others
    generated (greedy, ``cfg.batch_size`` prompts per batch, ``cfg.max_new_tokens`` new tokens).
    ``defer``: the others are not generated but counted (``stats.deferred_items``,
    ``deferred_questions``), so the table holds the copied rows only and ``backend`` only names the
    model (a run that trains nothing: ``QAConfig.when_model_reused``).
    Shape: one row per (item, question); sorted by item_id, qa_index.
    """
    cfg = cfg or QAConfig()
    prompt: QAPrompt = qa_prompt(cfg.prompt_version)
    if "item_id" not in items.column_names or "title" not in items.column_names:
        raise DataError(STAGE, "items", f"items table needs item_id and title, has {items.column_names}")
    cols = ["item_id"] + [c for c in QA_FIELDS if c in items.column_names]
    rows = {r["item_id"]: r for r in items.select(cols).to_pylist()}
    wanted = sorted(rows) if item_ids is None else sorted({int(i) for i in item_ids})
    absent = [i for i in wanted if i not in rows]
    if absent:
        raise DataError(STAGE, "items", f"{len(absent)} item(s) asked for QA are not in the items table, "
                                        f"e.g. {absent[:5]}")
    model_id, pv = backend.model_id, cfg.prompt_version
    hashes = {i: item_field_hash(rows[i]) for i in wanted}
    todo = items_to_generate(previous, hashes, model_id, pv)
    st = stats if stats is not None else QAStats()

    asks: list[tuple[int, int, QuestionTemplate, str, dict]] = []
    for iid in todo:
        for q_index, t, q in questions_for(rows[iid], cfg.k):
            asks.append((iid, q_index, t, q, rows[iid]))
    if defer:
        st.deferred_items += len(todo)
        st.deferred_questions += len(asks)
        todo, asks = [], []
    prompts = [prompt.answer.format(item=quote(render_item(r, prompt.item_format)), question=q)
               for _, _, _, q, r in asks]
    answers: list[str] = []
    if prompts:
        with Progress("qa", f"answering questions about {len(todo):,} items", len(prompts), "questions") as prog:
            answers = backend.generate(prompts, cfg.max_new_tokens, batch_size=cfg.batch_size,
                                       system=prompt.system, progress=prog)
    new: dict[str, list[Any]] = {c: [] for c in QA.columns}
    for (iid, q_index, t, q, r), raw in zip(asks, answers):
        a = validate_answer(raw, q, cfg.max_answer_chars)
        if a is not None and (t.check is None or t.check(a, r)):
            st.llm_answers_kept += 1
        else:
            a = t.fallback(r)[: cfg.max_answer_chars]
            st.fallbacks += 1
        for c, v in zip(QA.columns, (iid, q_index, q, a, model_id, pv, hashes[iid])):
            new[c].append(v)
    st.items += len(todo)
    st.questions += len(asks)
    out = pa.table(new, schema=QA.schema)
    if previous is not None and previous.num_rows:
        out = pa.concat_tables([_reusable(previous, hashes, model_id, pv).select(QA.columns).cast(QA.schema), out])
    if out.num_rows:
        order = np.lexsort((out["qa_index"].to_numpy(), out["item_id"].to_numpy()))
        out = out.take(pa.array(order))
    return out
