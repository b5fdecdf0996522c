"""Stage 2, the LLM judge: pair judgments (score, per-source keep verdict, optional reasoning) and
per-item QA pairs, with a local transformers backend or an OpenAI-compatible HTTP backend.

Modules: ``config`` (typed configs), ``text`` (item text rendering, sanitising, delimiting),
``prompts`` (versioned prompt families), ``backends`` (LocalLM, HttpLM, SentenceEmbedder),
``judge`` (judge_pairs, pairs_to_score, apply_keep_rules), ``qa`` (generate_qa),
``evaluate`` (ML-100K eval sets, AUC, injection flip rate), ``testing`` (tiny model, test server).
Importing this package loads no model and imports neither torch nor transformers.
"""
