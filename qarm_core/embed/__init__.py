"""Stages 3-4: the QARM V2 three-segment embedding LLM, its (DeepSpeed) training, and catalog embedding.

Entry points (small typed configs in ``config``; every call returns a small record of what it wrote):

* ``train.train_embedding_model(items, judgments, qa, out_dir, EmbedModelConfig, TrainConfig)``
  -> ``TrainRecord`` (in-process, or ``nproc`` processes per node on ``nnodes`` nodes via torchrun /
  the deepspeed launcher); ``train.write_job`` + ``train.build_launch_command`` for a scheduler
  that starts the processes.
* ``embed.embed_catalog(items, out_dir, EmbedModelConfig, EmbedConfig)`` -> ``EmbedRecord``
  (fine-tuned folder, or a base model as baseline); ``embed.embed_catalog_minilm`` (MiniLM baseline).
* ``evaluate.evaluate_embeddings(path, heldout_pairs)`` -> ``RetrievalMetrics`` (recall@k, MRR).
* ``data.split_pairs`` (holdout split by unordered pair), ``data.template_qa`` (QA without an LLM).

Modules: ``config``, ``model`` (mask, ``ThreeSegmentLM``, load/save), ``data``, ``losses``,
``train``, ``worker`` (the multi-process entry point), ``embed``, ``evaluate``.
Importing this package (or ``config``, ``train``, ``embed``, ``evaluate``) imports neither torch
nor transformers; ``model`` and ``losses`` import torch.

Environment: set ``OMP_WAIT_POLICY=PASSIVE`` for processes that train or embed on a CPU another busy
process shares (launched workers, which share the cores with each other, get it from
``train.launch_env``). Alone on the CPU, OpenMP's default wait is faster: training 246 vs 229
tokens/s (bf16) and 136 vs 121 (float32), judge 14.9 vs 13.2 pairs/s (``benchmarks/bench_embed.py``
and a judge probe, 2-core AMD EPYC with avx512_bf16).
"""
