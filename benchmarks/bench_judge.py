"""Benchmark of the LLM judge (stage 2) on ML-100K with the default model, on this CPU.

Prints one table: judge throughput (pairs/s, bf16, batched, one forward pass per pair; with and
without the per-item neutral pass already cached), AUC of the default judge and of its LLM part
alone on both eval sets (co-occurrence, genre), the prompt-injection flip rate, and QA items/s.
Wall-clock rates depend on what else runs on the machine: the table also gives the load average
and the rate per CPU-second of this process (x2 for the 2 cores).

    python benchmarks/bench_judge.py [--n-per-class 150] [--flip-pairs 100] [--qa-items 16] [--json out.json]
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
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-per-class", type=int, default=150)
    ap.add_argument("--flip-pairs", type=int, default=100, help="eval pairs per set used for the flip rate")
    ap.add_argument("--qa-items", type=int, default=16)
    ap.add_argument("--throughput-pairs", type=int, default=512)
    ap.add_argument("--model-path", default=None, help="HF causal-LM folder (default: SmolLM2 from the GGUF)")
    ap.add_argument("--cache-dir", default=str(REPO / ".cache" / "judge"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import pyarrow as pa
    import torch

    from qarm_core.ingest import fetch_recbole_wheel, read_ml100k
    from qarm_core.judge.backends import LocalLM, SentenceEmbedder
    from qarm_core.judge.config import JudgeConfig, LocalModelConfig, QAConfig
    from qarm_core.judge.evaluate import EvalSetParams, auc, build_eval_sets, injection_flip_rate
    from qarm_core.judge.judge import PairScorer, score_pairs
    from qarm_core.judge.prompts import judge_prompt
    from qarm_core.judge.qa import QAStats, generate_qa
    from qarm_core.judge.text import render_items

    torch.set_num_threads(2)
    cfg = JudgeConfig()
    local = LocalModelConfig(**{**cfg.local.model_dump(), "model_path": args.model_path, "cache_dir": args.cache_dir})
    inter, items = read_ml100k(fetch_recbole_wheel(REPO / ".cache" / "recbole"))
    sets = build_eval_sets(inter, items, EvalSetParams(n_per_class=args.n_per_class))
    (lm, emb), load_s, _ = _timed(lambda: (LocalLM(local), SentenceEmbedder()))
    prompt = judge_prompt(cfg.prompt_version)
    res: dict = {"model_id": lm.model_id, "prompt_version": cfg.prompt_version, "dtype": local.dtype,
                 "batch_size": local.batch_size, "embed_weight": cfg.embed_weight, "load_s": load_s}

    # -- AUC: the default judge and its LLM part alone (same forward passes)
    for name, tbl in sets.items():
        src, dst = tbl["src_item"].to_pylist(), tbl["dst_item"].to_pylist()
        texts = render_items(items, set(src) | set(dst), prompt.item_format)
        sc = PairScorer(lm, prompt, emb, cfg.embed_weight)
        a, b = [texts[i] for i in src], [texts[i] for i in dst]
        pmi, cos = sc.llm_pmi(a, b), sc.cosine(a, b)
        y = tbl["label"].to_numpy()
        res[f"auc_{name}"] = auc(y, pmi + cfg.embed_weight * cos)
        res[f"auc_{name}_llm_only"] = auc(y, pmi)
        res[f"auc_{name}_embed_only"] = auc(y, cos)

    # -- throughput on distinct random pairs (every pair has its own src; worst case for caching)
    rng = np.random.default_rng(1)
    ids = np.array(sorted(items["item_id"].to_pylist()))
    n = args.throughput_pairs
    s_ids = rng.choice(ids, n)
    d_ids = rng.choice(ids, n)
    d_ids = np.where(d_ids == s_ids, (d_ids % len(ids)) + 1, d_ids)
    pairs = pa.table({"src_item": pa.array(s_ids, pa.int64()), "dst_item": pa.array(d_ids, pa.int64())})
    sc = PairScorer(lm, prompt, emb, cfg.embed_weight)
    load_before = os.getloadavg()[0]
    _, w1, c1 = _timed(lambda: score_pairs(pairs, items, sc))          # pairs + neutral + embeddings
    _, w2, c2 = _timed(lambda: score_pairs(pairs, items, PairScorer(lm, prompt)))  # LLM only, cold
    sc_warm = PairScorer(lm, prompt)
    sc_warm.llm_pmi(*zip(*[("x", t) for t in render_items(items, set(d_ids.tolist()), prompt.item_format).values()]))
    _, w3, c3 = _timed(lambda: score_pairs(pairs, items, sc_warm))      # neutral passes cached
    res.update({"pairs_per_s_default_cold": n / w1, "pairs_per_s_llm_cold": n / w2,
                "pairs_per_s_llm_neutral_cached": n / w3,
                "pairs_per_2cpu_s_default_cold": 2 * n / c1, "pairs_per_2cpu_s_llm_neutral_cached": 2 * n / c3,
                "loadavg_1m": (load_before + os.getloadavg()[0]) / 2})

    # -- prompt injection
    if args.flip_pairs:
        sub = {k: pa.concat_tables([t.slice(0, args.flip_pairs // 2),
                                    t.slice(t.num_rows // 2, args.flip_pairs // 2)]) for k, t in sets.items()}
        fr, wf, _ = _timed(lambda: injection_flip_rate(sub, items, PairScorer(lm, prompt, emb, cfg.embed_weight)))
        res.update({f"injection_{k}": v for k, v in fr.items()})

    # -- QA
    if args.qa_items:
        qcfg = QAConfig()
        st = QAStats()
        qa_ids = ids[: args.qa_items].tolist()
        qa, wq, cq = _timed(lambda: generate_qa(items, lm, qcfg, item_ids=qa_ids, stats=st))
        res.update({"qa_items_per_s": len(qa_ids) / wq, "qa_rows": qa.num_rows,
                    "qa_llm_answer_kept_rate": st.llm_answers_kept / max(1, st.questions),
                    "qa_k": qcfg.k, "qa_max_new_tokens": qcfg.max_new_tokens,
                    "qa_examples": [f"{r['question']} -> {r['answer']}" for r in qa.slice(0, 6).to_pylist()]})

    rows = [
        ("model", f"{res['model_id']} ({res['dtype']}, batch {res['batch_size']}) + MiniLM x{res['embed_weight']:g}"),
        ("AUC co-occurrence: default / LLM only / MiniLM only",
         f"{res['auc_cooc']:.3f} / {res['auc_cooc_llm_only']:.3f} / {res['auc_cooc_embed_only']:.3f}"),
        ("AUC genre: default / LLM only / MiniLM only",
         f"{res['auc_genre']:.3f} / {res['auc_genre_llm_only']:.3f} / {res['auc_genre_embed_only']:.3f}"),
        ("pairs/s default, cold (pair + neutral + embed)", f"{res['pairs_per_s_default_cold']:.1f}"
         f"  ({res['pairs_per_2cpu_s_default_cold']:.1f} per 2 CPU-s)"),
        ("pairs/s LLM, cold", f"{res['pairs_per_s_llm_cold']:.1f}"),
        ("pairs/s LLM, neutral cached (1 fwd/pair)", f"{res['pairs_per_s_llm_neutral_cached']:.1f}"
         f"  ({res['pairs_per_2cpu_s_llm_neutral_cached']:.1f} per 2 CPU-s)"),
        ("load average during throughput", f"{res['loadavg_1m']:.1f}"),
    ]
    if args.flip_pairs:
        rows += [("injection flip rate (benign edit)", f"{res['injection_flip_rate']:.3f} "
                  f"({res['injection_benign_flip_rate']:.3f}); reject->keep {res['injection_reject_to_keep']:.3f}; "
                  f"n={res['injection_n_decisions']}")]
    if args.qa_items:
        rows += [("QA items/s (k, max_new_tokens)", f"{res['qa_items_per_s']:.2f} ({res['qa_k']}, "
                  f"{res['qa_max_new_tokens']}); LLM answers kept {res['qa_llm_answer_kept_rate']:.2f}")]
    w = max(len(r[0]) for r in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
    for ex in res.get("qa_examples", []):
        print("  QA:", ex)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=float))
    return res


if __name__ == "__main__":
    main()
