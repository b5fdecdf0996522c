"""Benchmark of the LLM judge (stage 2) on ML-100K with the default model, on this CPU.

Prints one table: judge throughput (pairs/s, bf16, batched, one forward pass per pair; with and
without the per-item neutral pass already cached), AUC of the default judge and of its LLM part
alone on both eval sets (co-occurrence, genre), the prompt-injection flip rate, and QA items/s.
Wall-clock rates depend on what else runs on the machine: the table also gives the load average
and the rate per CPU-second of this process (x2 for the 2 cores).

    python benchmarks/bench_judge.py [--prompt-version pmi-fs-v2] [--n-per-class 150] [--flip-pairs 100]
                                     [--qa-items 16] [--json out.json]
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
    ap.add_argument("--prompt-version", default=None, help="judge prompt (default: the config's)")
    ap.add_argument("--n-per-class", type=int, default=150)
    ap.add_argument("--flip-pairs", type=int, default=100, help="eval pairs per set used for the flip rate")
    ap.add_argument("--qa-items", type=int, default=16)
    ap.add_argument("--throughput-pairs", type=int, default=512)
    ap.add_argument("--model-path", default=None, help="HF causal-LM folder (default: SmolLM2 from the GGUF)")
    ap.add_argument("--cache-dir", default=None, help="where the GGUF is converted once (default "
                    "$QARM_CACHE/judge or ~/.cache/qarm/judge)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import pyarrow as pa
    import torch

    from qarm_core.ingest import fetch_recbole_wheel, read_ml100k
    from qarm_core.lm.local import LocalLM
    from qarm_core.lm.sentence import SentenceEmbedder
    from qarm_core.judge.config import JudgeConfig, QAConfig
    from qarm_core.lm.config import LocalModelConfig
    from qarm_core.judge.evaluate import EvalSetParams, auc, build_eval_sets, injection_flip_rate
    from qarm_core.judge.judge import PairScorer, make_scorer, pair_components, score_pairs
    from qarm_core.judge.prompts import judge_prompt
    from qarm_core.judge.qa import QAStats, generate_qa
    from qarm_core.lm.text import render_items

    torch.set_num_threads(2)
    cfg = JudgeConfig() if args.prompt_version is None else JudgeConfig(prompt_version=args.prompt_version)
    local = LocalModelConfig(**{**cfg.local.model_dump(), "model_path": args.model_path, "cache_dir": args.cache_dir})
    inter, items = read_ml100k(fetch_recbole_wheel(REPO / ".cache" / "recbole"))
    sets = build_eval_sets(inter, items, EvalSetParams(n_per_class=args.n_per_class))
    (lm, emb), load_s, _ = _timed(lambda: (LocalLM(local), SentenceEmbedder()))
    prompt = judge_prompt(cfg.prompt_version)
    res: dict = {"model_id": lm.model_id, "prompt_version": cfg.prompt_version, "dtype": lm.dtype_choice.name,
                 "batch_size": local.batch_size, "embed_weight": cfg.embed_weight,
                 "tag_weight": cfg.tag_weight, "load_s": load_s}

    # -- AUC: the default judge and each of its terms alone (same forward passes)
    for name, tbl in sets.items():
        parts = pair_components(tbl, items, make_scorer(cfg, lm, emb))
        y = tbl["label"].to_numpy()
        res[f"auc_{name}"] = auc(y, make_scorer(cfg, lm, emb).combine(parts))
        res[f"auc_{name}_llm_only"] = auc(y, parts["pmi"])
        res[f"auc_{name}_text_cos_only"] = auc(y, parts["cos"])
        res[f"auc_{name}_tag_cos_only"] = auc(y, parts["tag_cos"])
        res[f"auc_{name}_llm_text_cos"] = auc(y, parts["pmi"] + cfg.embed_weight * parts["cos"])

    # -- throughput on distinct random pairs (every pair has its own src; worst case for caching)
    rng = np.random.default_rng(1)
    ids = np.array(sorted(items["item_id"].to_pylist()))
    n = args.throughput_pairs
    s_ids = rng.choice(ids, n)
    d_ids = rng.choice(ids, n)
    d_ids = np.where(d_ids == s_ids, (d_ids % len(ids)) + 1, d_ids)
    pairs = pa.table({"src_item": pa.array(s_ids, pa.int64()), "dst_item": pa.array(d_ids, pa.int64())})
    sc = make_scorer(cfg, lm, emb)
    load_before = os.getloadavg()[0]
    _, w1, c1 = _timed(lambda: score_pairs(pairs, items, sc))          # pairs + neutral + embeddings
    _, w2, c2 = _timed(lambda: score_pairs(pairs, items, PairScorer(lm, prompt)))  # LLM only, cold
    sc_warm = PairScorer(lm, prompt)
    sc_warm.llm_pmi(*zip(*[("x", t) for t in render_items(items, set(d_ids.tolist()), prompt.scored_format).values()]))
    _, w3, c3 = _timed(lambda: score_pairs(pairs, items, sc_warm))      # neutral passes cached
    # swing-like: 32 source items x 16 candidates each (each context runs once for its 16 pairs)
    g_src = np.repeat(rng.choice(ids, 32, replace=False), 16)
    g_dst = rng.choice(ids, len(g_src))
    g_dst = np.where(g_dst == g_src, (g_dst % len(ids)) + 1, g_dst)
    gpairs = pa.table({"src_item": pa.array(g_src, pa.int64()), "dst_item": pa.array(g_dst, pa.int64())})
    sc_warm.llm_pmi(*zip(*[("x", t) for t in render_items(items, set(g_dst.tolist()), prompt.scored_format).values()]))
    _, w4, c4 = _timed(lambda: score_pairs(gpairs, items, sc_warm))
    res.update({"pairs_per_s_default_cold": n / w1, "pairs_per_s_llm_cold": n / w2,
                "pairs_per_s_llm_neutral_cached": n / w3, "pairs_per_s_llm_grouped_neutral_cached": len(g_src) / w4,
                "pairs_per_2cpu_s_default_cold": 2 * n / c1, "pairs_per_2cpu_s_llm_neutral_cached": 2 * n / c3,
                "loadavg_1m": (load_before + os.getloadavg()[0]) / 2})

    # -- prompt injection
    if args.flip_pairs:
        sub = {k: pa.concat_tables([t.slice(0, args.flip_pairs // 2),
                                    t.slice(t.num_rows // 2, args.flip_pairs // 2)]) for k, t in sets.items()}
        fr, wf, _ = _timed(lambda: injection_flip_rate(sub, items, make_scorer(cfg, lm, emb)))
        res.update({f"injection_{k}": v for k, v in fr.items()})
        fr = injection_flip_rate(sub, items, PairScorer(lm, prompt))
        res.update({f"injection_llm_only_{k}": v for k, v in fr.items()})

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
        ("model", f"{res['model_id']} ({res['dtype']}, batch {res['batch_size']}), prompt {res['prompt_version']}; "
                  f"+ MiniLM text x{res['embed_weight']:g} + tags x{res['tag_weight']:g}"),
    ]
    for name, label in (("cooc", "co-occurrence"), ("genre", "genre")):
        rows.append((f"AUC {label}: default | LLM | text cos | tag cos | LLM+text cos",
                     " | ".join(f"{res[f'auc_{name}{suf}']:.3f}" for suf in
                                ("", "_llm_only", "_text_cos_only", "_tag_cos_only", "_llm_text_cos"))))
    rows += [
        ("pairs/s default, cold (pair + neutral + embed)", f"{res['pairs_per_s_default_cold']:.1f}"
         f"  ({res['pairs_per_2cpu_s_default_cold']:.1f} per 2 CPU-s)"),
        ("pairs/s LLM, cold (pair + neutral)", f"{res['pairs_per_s_llm_cold']:.1f}"),
        ("pairs/s LLM, neutral cached (1 fwd/pair)", f"{res['pairs_per_s_llm_neutral_cached']:.1f}"
         f"  ({res['pairs_per_2cpu_s_llm_neutral_cached']:.1f} per 2 CPU-s)"),
        ("pairs/s LLM, 32 src x 16 dst, neutral cached", f"{res['pairs_per_s_llm_grouped_neutral_cached']:.1f}"),
        ("load average during throughput", f"{res['loadavg_1m']:.1f}"),
    ]
    if args.flip_pairs:
        for pre, label in (("injection_", "default"), ("injection_llm_only_", "LLM only")):
            rows += [(f"injection flip rate {label} (benign title edit)",
                      f"{res[pre + 'flip_rate']:.3f} ({res[pre + 'benign_flip_rate']:.3f}); reject->keep "
                      f"{res[pre + 'reject_to_keep']:.3f} ({res[pre + 'benign_reject_to_keep']:.3f}); mean score "
                      f"shift {res[pre + 'mean_score_shift']:+.2f} ({res[pre + 'benign_mean_score_shift']:+.2f}); "
                      f"n={res[pre + 'n_decisions']}")]
    if args.qa_items:
        rows += [("QA items/s (k, max_new_tokens)", f"{res['qa_items_per_s']:.2f} ({res['qa_k']}, "
                  f"{res['qa_max_new_tokens']}); LLM answers kept {res['qa_llm_answer_kept_rate']:.2f}")]
    from benchmarks.harness import machine

    rows.append(("machine", machine()))
    w = max(len(r[0]) for r in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
    for ex in res.get("qa_examples", []):
        print("  QA:", ex)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=float))
    return res


if __name__ == "__main__":
    main()
