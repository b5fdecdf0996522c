"""Stage 6: ranking. Time-ordered samples, GSU retrieval over long histories, an ESU with Semantic-ID
tokens, and DIN / SIM-hard / SIM-soft baselines in one harness (library only: no Prefect, no MLflow).

Modules: ``config`` (RankConfig), ``samples`` (the protocol), ``inputs`` (embeddings and codes
aligned to a dense item index, MiniLM fallback), ``gsu`` (searches), ``models`` (ESU and
baselines), ``data`` (arrays and batches), ``metrics`` (AUC, GAUC, logloss), ``train`` and
``compare`` (seeds, tables, curves), ``pipeline`` (load inputs, build samples, prepare data).
"""
