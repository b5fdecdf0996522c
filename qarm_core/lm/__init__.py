"""The language models qarm runs, shared by every stage that runs one.

``config``: typed configs (local LM, HTTP server, sentence embedder). ``assets``: model files
(SmolLM2 converted once from its GGUF, MiniLM from its package). ``backend``: the backend protocol
(``continuation_logprobs``, ``generate``) and ``make_backend``. ``local``: a transformers causal LM
with prefix/context caches and a greedy decoder. ``http``: an OpenAI-compatible server client.
``sentence``: MiniLM sentence and item-text embeddings. ``text``: item text as every model reads it
(rendered, sanitised, delimited). ``tiny``: a tiny random llama standing in for the LLM in tests
and in benchmarks of the pipeline's own cost.

Nothing here imports torch or transformers at import time.
"""
