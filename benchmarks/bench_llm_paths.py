"""Benchmark of the two LLM inner loops of stage 2 on ML-100K with the default model, on this CPU:
each new path against the one it replaced, on the same inputs, in one run.

* Judge scoring, the ``make run`` shape: Swing pairs (ratings >= 4, ``top_k`` neighbours per source
  item, the ML-100K config's 5) of ``--judge-sources`` source items, neutral passes cached. One
  sequence per pair (``share_context_min: 0``, the previous path) against each source item's
  context run once and several contexts per forward pass (``share_context_min: 2``, the default).
* QA generation: ``--qa-items`` items x the default ``qa.k`` questions (4). transformers'
  ``generate`` (greedy, left-padded batches: the first path) against qarm's decoder (shared
  chat-template prefix, right-padded rows on its cache, rows leave the batch at their stop token);
  and qarm's decoder with each item's questions grouped (the item's text run once for its
  questions, ``share_context_min: 2``, the default) against it without groups (``0``, the previous
  path).
* The shared prefix (the judge's few-shot examples; the QA prompts' chat template and system turn),
  in both loops with their defaults otherwise: its keys and values copied into every row's cache
  (``prefix_attention: copied``, the previous path) against read in place by every row
  (``shared``, the default on a CPU; ``qarm_core/lm/prefix_attention.py``).
* The judge's prompt: ``--previous-prompt`` (``pmi-fs-v1``, B scored with its genres) against the
  default (B scored by title and year) on the same pairs, with the B tokens a pair runs.

Both paths run in the same process, one after the other, twice each in alternating order (the
table shows the faster of the two runs of each); the load average is printed with the figures.

    python benchmarks/bench_llm_paths.py [--judge-sources 120] [--qa-items 96] [--dtype float32]
                                         [--skip-judge] [--skip-transformers] [--skip-grouping]
                                         [--previous-prompt pmi-fs-v1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _best_of_two(a, b):
    """Run a, b, b, a; return ((result_a, seconds_a), (result_b, seconds_b)) with the faster times."""
    times: dict[str, list[float]] = {"a": [], "b": []}
    out: dict[str, object] = {}
    for name, fn in (("a", a), ("b", b), ("b", b), ("a", a)):
        t0 = time.perf_counter()
        out[name] = fn()
        times[name].append(time.perf_counter() - t0)
    return (out["a"], min(times["a"])), (out["b"], min(times["b"]))


def hf_generate(lm, prompts: list[str], max_new_tokens: int, bs: int, system: str) -> list[str]:
    """The previous QA path: transformers' greedy ``generate`` over left-padded batches."""
    import torch

    tok = lm.tokenizer
    texts = [lm.chat_prompt(p, system) for p in prompts]
    out = [""] * len(texts)
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]))
    old_side, tok.padding_side = tok.padding_side, "left"
    try:
        with torch.inference_mode():
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                enc = tok([texts[k] for k in idx], return_tensors="pt", padding=True, add_special_tokens=False)
                gen = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tok.pad_token_id)
                for k, row in zip(idx, gen[:, enc["input_ids"].shape[1]:]):
                    out[k] = tok.decode(row, skip_special_tokens=True).strip()
    finally:
        tok.padding_side = old_side
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--judge-sources", type=int, default=120, help="source items whose Swing pairs are scored")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--qa-items", type=int, default=96)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="float32 on a CPU with native bf16 stands in for one without")
    ap.add_argument("--skip-judge", action="store_true", help="QA paths only")
    ap.add_argument("--skip-transformers", action="store_true", help="leave out transformers' generate (slow)")
    ap.add_argument("--skip-grouping", action="store_true",
                    help="leave out the grouping comparisons (the prefix attention's only)")
    ap.add_argument("--previous-prompt", default="pmi-fs-v1",
                    help="judge prompt timed against the default on the same pairs (the default itself: skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch

    from qarm_core.ingest import fetch_recbole_wheel, read_ml100k
    from qarm_core.lm.local import LocalLM
    from qarm_core.judge.config import JudgeConfig, QAConfig
    from qarm_core.lm.config import LocalModelConfig
    from qarm_core.judge.judge import PairScorer
    from qarm_core.judge.prompts import judge_prompt, qa_prompt
    from qarm_core.judge.qa import questions_for
    from qarm_core.lm.text import quote, render_item, render_items
    from qarm_core.pairs.config import SwingConfig
    from qarm_core.pairs.swing import mine_swing_pairs

    torch.set_num_threads(2)
    inter, items = read_ml100k(fetch_recbole_wheel(REPO / ".cache" / "recbole"))
    lms = {m: LocalLM(LocalModelConfig(share_context_min=m, dtype=args.dtype)) for m in (0, 2)}
    copied = LocalLM(LocalModelConfig(dtype=args.dtype, prefix_attention="copied"))
    load0 = os.getloadavg()[0]
    res: dict = {}
    table: list[tuple[str, str]] = []
    if not args.skip_judge:
        pos = inter.filter(pc.greater_equal(inter["rating"], 4))
        pairs = mine_swing_pairs(pos["user_id"].to_numpy(), pos["item_id"].to_numpy(), SwingConfig(top_k=args.top_k))
        srcs = np.unique(pairs["src_item"].to_numpy())
        pick = np.random.default_rng(0).choice(srcs, min(args.judge_sources, len(srcs)), replace=False)
        pairs = pairs.filter(pc.is_in(pairs["src_item"], pa.array(pick)))
        def judge_inputs(version: str):
            """(A texts, B texts as scored, neutral values) of the pairs under prompt ``version``."""
            prompt = judge_prompt(version)
            texts = render_items(items, set(pairs["src_item"].to_pylist()), prompt.item_format)
            b_texts = render_items(items, set(pairs["dst_item"].to_pylist()), prompt.scored_format)   # B as scored
            src = [texts[i] for i in pairs["src_item"].to_pylist()]
            dst = [b_texts[i] for i in pairs["dst_item"].to_pylist()]
            warm = PairScorer(lms[2], prompt)
            warm.llm_pmi(src[:1] * len(set(dst)), sorted(set(dst)))
            neutral = {warm.continuation(t): warm.neutral_of(t) for t in set(dst)}     # the same for every path
            return prompt, src, dst, neutral

        def pmi(lm, version: str = JudgeConfig().prompt_version) -> np.ndarray:
            """The pairs' PMI by a new scorer (a scorer keeps what it computed: a second call on the
            same one would cost nothing), neutral passes known: the pairs' forward passes only."""
            prompt, src, dst, neutral = inputs[version]
            sc = PairScorer(lm, prompt)
            sc.preload_neutral(neutral)
            return sc.llm_pmi(src, dst)

        inputs = {v: judge_inputs(v) for v in {JudgeConfig().prompt_version, args.previous_prompt}}
        scorers = {m: (lambda lm=lm: pmi(lm)) for m, lm in lms.items()} | {"copied": lambda: pmi(copied)}
        n = len(pairs)
        if args.previous_prompt != JudgeConfig().prompt_version:
            # the default prompt scores B by title and year, the previous one with its genres too
            def b_tokens(version: str) -> float:
                """Mean tokens of B a pair runs under ``version`` (its continuation, as scored)."""
                prompt, _, dst, _ = inputs[version]
                cont = PairScorer(lms[2], prompt).continuation
                return float(np.mean([len(lms[2].tokenizer(cont(b), add_special_tokens=False)["input_ids"])
                                      for b in dst]))

            tokens = {v: b_tokens(v) for v in inputs}
            (_, t_prev), (_, t_cur) = _best_of_two(lambda: pmi(lms[2], args.previous_prompt), scorers[2])
            res |= {"judge_prompt_previous": args.previous_prompt, "judge_prompt": JudgeConfig().prompt_version,
                    "judge_b_tokens_previous": tokens[args.previous_prompt],
                    "judge_b_tokens": tokens[JudgeConfig().prompt_version],
                    "judge_pairs_per_s_previous_prompt": n / t_prev, "judge_pairs_per_s_prompt": n / t_cur,
                    "judge_prompt_speedup": t_prev / t_cur}
            table += [
                (f"judge B tokens a pair: {args.previous_prompt} (previous) / {JudgeConfig().prompt_version} (default)",
                 f"{res['judge_b_tokens_previous']:.1f} / {res['judge_b_tokens']:.1f}"),
                (f"judge pairs/s: prompt {args.previous_prompt} (previous)", f"{res['judge_pairs_per_s_previous_prompt']:.1f}"),
                (f"judge pairs/s: prompt {JudgeConfig().prompt_version} (default)", f"{res['judge_pairs_per_s_prompt']:.1f}"),
                ("judge speed-up of the prompt", f"{res['judge_prompt_speedup']:.2f}x")]
        table.append(("judge: Swing pairs scored (source items x top_k)", f"{n:,} ({len(pick)} x <= {args.top_k})"))
        res |= {"judge_pairs": n, "judge_sources": len(pick)}
        if not args.skip_grouping:
            (s_old, t_old), (s_new, t_new) = _best_of_two(scorers[0], scorers[2])
            res |= {"judge_pairs_per_s_one_sequence_per_pair": n / t_old,
                    "judge_pairs_per_s_grouped": n / t_new, "judge_speedup": t_old / t_new,
                    "judge_max_abs_score_diff": float(np.max(np.abs(np.asarray(s_old) - np.asarray(s_new)))),
                    "judge_score_std": float(np.std(s_old))}
            table += [
                ("judge pairs/s: one sequence per pair (previous)", f"{res['judge_pairs_per_s_one_sequence_per_pair']:.1f}"),
                ("judge pairs/s: contexts shared and batched (default)", f"{res['judge_pairs_per_s_grouped']:.1f}"),
                ("judge speed-up", f"{res['judge_speedup']:.2f}x"),
                ("judge max |score difference| (score std)",
                 f"{res['judge_max_abs_score_diff']:.3f} ({res['judge_score_std']:.2f})")]
        # the prefix's keys copied per row vs read in place (both with shared contexts)
        (s_cp, t_cp), (s_sh, t_sh) = _best_of_two(scorers["copied"], scorers[2])
        res |= {"judge_pairs_per_s_prefix_copied": n / t_cp, "judge_pairs_per_s_prefix_shared": n / t_sh,
                "judge_prefix_speedup": t_cp / t_sh,
                "judge_prefix_max_abs_score_diff": float(np.max(np.abs(np.asarray(s_cp) - np.asarray(s_sh))))}
        table += [
            ("judge pairs/s: prefix keys copied per row (previous)", f"{res['judge_pairs_per_s_prefix_copied']:.1f}"),
            ("judge pairs/s: prefix keys read in place (default)", f"{res['judge_pairs_per_s_prefix_shared']:.1f}"),
            ("judge speed-up of the shared prefix", f"{res['judge_prefix_speedup']:.2f}x"),
            ("judge max |score difference|, shared vs copied prefix", f"{res['judge_prefix_max_abs_score_diff']:.1e}")]

    qcfg = QAConfig()
    qp = qa_prompt(qcfg.prompt_version)
    rows = {r["item_id"]: r for r in items.select(["item_id", "title", "year", "tags"]).to_pylist()}
    ids = sorted(rows)[: args.qa_items]
    prompts = [qp.answer.format(item=quote(render_item(rows[i], qp.item_format)), question=q)
               for i in ids for _, _, q in questions_for(rows[i], qcfg.k)]
    lm, lm_flat = lms[2], lms[0]
    bs = qcfg.local.batch_size
    table.append(("QA: items x questions", f"{len(ids)} x {qcfg.k} = {len(prompts)} prompts, "
                                           f"<= {qcfg.max_new_tokens} new tokens"))
    if not args.skip_transformers:
        (a_old, q_old), (a_new, q_new) = _best_of_two(
            lambda: hf_generate(lm_flat, prompts, qcfg.max_new_tokens, bs, qp.system),
            lambda: lm_flat.generate(prompts, qcfg.max_new_tokens, batch_size=bs, system=qp.system))
        res |= {"qa_items_per_s_transformers_generate": len(ids) / q_old, "qa_items_per_s_qarm": len(ids) / q_new,
                "qa_speedup": q_old / q_new, "qa_same_answer_share": float(np.mean([a == b for a, b in zip(a_old, a_new)]))}
        table += [
            ("QA items/s: transformers generate (first path)", f"{res['qa_items_per_s_transformers_generate']:.2f}"),
            ("QA items/s: qarm greedy decoder, prompts alone", f"{res['qa_items_per_s_qarm']:.2f}"),
            ("QA speed-up", f"{res['qa_speedup']:.2f}x"),
            ("QA answers identical to transformers'", f"{res['qa_same_answer_share']:.1%}")]
    if not args.skip_grouping:
        (a_flat, q_flat), (a_grp, q_grp) = _best_of_two(
            lambda: lm_flat.generate(prompts, qcfg.max_new_tokens, batch_size=bs, system=qp.system),
            lambda: lm.generate(prompts, qcfg.max_new_tokens, batch_size=bs, system=qp.system))
        res |= {"qa_items_per_s_ungrouped": len(ids) / q_flat,
                "qa_items_per_s_grouped": len(ids) / q_grp, "qa_group_speedup": q_flat / q_grp,
                "qa_grouped_same_answer_share": float(np.mean([a == b for a, b in zip(a_flat, a_grp)]))}
        table += [
            ("QA items/s: qarm decoder, each prompt alone (previous)", f"{res['qa_items_per_s_ungrouped']:.2f}"),
            ("QA items/s: qarm decoder, an item's questions grouped (default)", f"{res['qa_items_per_s_grouped']:.2f}"),
            ("QA speed-up of grouping", f"{res['qa_group_speedup']:.2f}x"),
            ("QA answers identical with and without groups", f"{res['qa_grouped_same_answer_share']:.1%}")]
    (a_cp, q_cp), (a_sh, q_sh) = _best_of_two(
        lambda: copied.generate(prompts, qcfg.max_new_tokens, batch_size=bs, system=qp.system),
        lambda: lm.generate(prompts, qcfg.max_new_tokens, batch_size=bs, system=qp.system))
    res |= {"qa_prompts": len(prompts), "qa_items": len(ids), "qa_items_per_s_prefix_copied": len(ids) / q_cp,
            "qa_items_per_s_prefix_shared": len(ids) / q_sh, "qa_prefix_speedup": q_cp / q_sh,
            "qa_prefix_same_answer_share": float(np.mean([a == b for a, b in zip(a_cp, a_sh)])),
            "loadavg_1m": (load0 + os.getloadavg()[0]) / 2, "batch_size": bs, "dtype": lm.dtype_choice.name,
            "threads": torch.get_num_threads()}
    from benchmarks.harness import machine

    table += [
        ("QA items/s: prefix keys copied per row (previous)", f"{res['qa_items_per_s_prefix_copied']:.2f}"),
        ("QA items/s: prefix keys read in place (default)", f"{res['qa_items_per_s_prefix_shared']:.2f}"),
        ("QA speed-up of the shared prefix", f"{res['qa_prefix_speedup']:.2f}x"),
        ("QA answers identical, shared vs copied prefix", f"{res['qa_prefix_same_answer_share']:.1%}"),
        ("model, dtype, batch, torch threads", f"SmolLM2-135M-Instruct, {res['dtype']}, {bs}, {res['threads']}"),
        ("load average (1 min) during the run", f"{res['loadavg_1m']:.2f}"),
        ("machine", machine()),
    ]
    w = max(len(k) for k, _ in table)
    print(f"| {'figure':<{w}} | value |\n|{'-' * (w + 2)}|---:|")
    print("\n".join(f"| {k:<{w}} | {v} |" for k, v in table))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
