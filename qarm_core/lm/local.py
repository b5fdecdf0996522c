"""A causal LM from a Hugging Face folder, run with transformers on the CPU or a GPU: batched
continuation scoring with shared prefix and context caches, and a greedy decoder."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qarm_core.allocator import keep_freed_memory
from qarm_core.lm.assets import SMOLLM2_NAME, ensure_smollm2
from qarm_core.lm.backend import BackendError
from qarm_core.lm.config import LocalModelConfig
from qarm_core.progress import Progress, advance

# Continuation rows per forward pass of shared contexts, in batches: their rows are length-sorted
# together, so a batch holds continuations of similar length.
ROWS_PER_CONTEXT_PASS = 4
# Prompts sharing a prefix beyond the common one form a group only where they share at least this
# many tokens and the group saves more than this many: an item's text before its QA questions is ~20
# tokens (ML-100K and synthetic items). Titles that merely begin alike share ~5 (synthetic items:
# 57 such groups among 256 one-question prompts ran 5% slower than none, float32 capped to AVX2,
# because splitting the prompts into grouped and lone ones leaves more part-filled batches to decode).
MIN_GROUP_PREFIX = 12
# Rows of LM-head output per block of the scorer's log-softmax (``LocalLM._token_logprobs``).
LOGSOFTMAX_ROWS = 64


def _view_of(cache: Any) -> Any:
    """A new key/value cache object over the same tensors. Selecting or repeating rows, and the
    forward pass that appends to it, replace a layer's tensors rather than write into them, so the
    source cache stays as it was without the deep copy (which copied every layer's keys and values
    for each batch)."""
    import copy

    view = copy.copy(cache)
    view.layers = [copy.copy(layer) for layer in cache.layers]
    return view


class _Prefix:
    """The prefix every request of a call shares (few-shot examples; chat template and system
    turn), ``n`` tokens, computed once. ``kv``: its (keys, values) per layer, read by every row
    through ``prefix_attention`` (rows' caches hold only their own tokens); else ``cache``: a
    key/value cache that each batch repeats per row (GPUs, models ``prefix_attention`` cannot serve)."""

    def __init__(self, n: int, cache: Any, shared: bool):
        self.n = n
        self.kv = [(layer.keys, layer.values) for layer in cache.layers] if shared else None
        self.cache = None if shared else cache

    def past_for(self, rows: int) -> tuple[Any, int]:
        """(the past cache a batch of ``rows`` starts from, or None; how many of the prefix's
        positions its attention mask must cover)."""
        if self.kv is not None:
            return None, 0
        past = _view_of(self.cache)
        past.batch_repeat_interleave(rows)
        return past, self.n


class _Context:
    """Token rows that later rows continue (a judged source item's context): their hidden state at
    each row's last token ``last`` (G, H), lengths ``lens`` (G,) and keys/values, either per layer
    ``kv`` [(keys, values) (G, kv_heads, width, head_dim)] read by packed rows, or a key/value
    ``cache`` with its attention mask ``att`` (G, m + width) for padded rows."""

    def __init__(self, last: Any, lens: Any, kv: list[tuple[Any, Any]] | None = None, cache: Any = None,
                 att: Any = None):
        self.last, self.lens, self.kv, self.cache, self.att = last, lens, kv, cache, att


class LocalLM:
    """A causal LM from an HF folder, run on CPU with transformers.

    Scoring sorts requests by length and batches ``batch_size`` of them, right-padded; the LM head
    is applied to the continuation positions only. Requests sharing a context (e.g. all pairs of one
    source item) run that context once and reuse its key/value cache.
    """

    def __init__(self, cfg: LocalModelConfig | None = None, model_id: str | None = None, weights: bool = True):
        """``weights=False``: the tokenizer, numeric type and identity only, for a driver whose
        calls run on workers' replicas (``qarm_core.lm.sharded``); it cannot score or generate."""
        self.cfg = cfg or LocalModelConfig()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(self.cfg.model_path) if self.cfg.model_path else ensure_smollm2(self.cfg.cache_dir)
        if not (path / "config.json").exists():
            raise BackendError(f"{path} is not a Hugging Face model folder (no config.json)")
        from qarm_core.devices import resolve_device, resolve_dtype

        if self.cfg.num_threads and weights:
            torch.set_num_threads(self.cfg.num_threads)
        self.device = resolve_device(self.cfg.device, "judge", "local.device")
        self.dtype_choice = resolve_dtype(self.cfg.dtype, self.device, "judge", "local.dtype")
        self.dtype = self.dtype_choice.torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).eval().to(self.device) \
            if weights else None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.shared_prefix = bool(weights) and self._use_shared_prefix()
        name = self.cfg.model_path and Path(self.cfg.model_path).name or SMOLLM2_NAME
        self.model_id = model_id or f"local:{name}"
        self._lock = threading.Lock()

    def _use_shared_prefix(self) -> bool:
        """``prefix_attention: shared`` where it can run (a CPU, a model ``prefix_attention``
        supports); the model's attention is then switched to it."""
        from qarm_core.lm import prefix_attention

        if self.cfg.prefix_attention != "shared" or self.device != "cpu" \
                or not prefix_attention.supports(self.model):
            return False
        prefix_attention.register()
        self.model.set_attn_implementation(prefix_attention.NAME)
        return True

    def _forward(self, prefix: "_Prefix | None", **kw: Any) -> Any:
        """The model body's forward pass (``kw`` as ``model.model`` takes them), attending over the
        shared prefix first where ``prefix`` is read in place."""
        if prefix is not None and prefix.kv is not None:
            from qarm_core.lm import prefix_attention

            with prefix_attention.reading(prefix.kv):
                return self.model.model(**kw)
        return self.model.model(**kw)

    # -- scoring
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @keep_freed_memory()
    def continuation_logprobs(self, contexts: Sequence[str], continuations: Sequence[str],
                              prefix: str = "", progress: Progress | None = None) -> list[np.ndarray]:
        """Per-token log P(continuation | prefix + context); list of n arrays of shape
        (len(tokens(cont_i)),). ``prefix`` (e.g. few-shot examples) is shared by all n requests:
        its key/value cache is computed once and reused, so it costs nothing per request.
        ``progress`` advances by the requests of each finished batch."""
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        import torch

        pre = self._ids(prefix) if prefix else []
        ctx_ids: dict[str, list[int]] = {}
        enc = []
        for c, x in zip(contexts, continuations):
            if c not in ctx_ids:
                ctx_ids[c] = self._ids(c)
            xi = self._ids(x)
            if not ctx_ids[c] or not xi:
                raise ValueError("context and continuation must both tokenize to at least one token")
            if len(pre) + len(ctx_ids[c]) + len(xi) > self.cfg.max_tokens:
                raise ValueError(f"prompt of {len(pre) + len(ctx_ids[c]) + len(xi)} tokens exceeds "
                                 f"max_tokens={self.cfg.max_tokens}")
            enc.append((ctx_ids[c], xi))
        out: list[np.ndarray | None] = [None] * len(enc)
        groups: dict[str, list[int]] = {}
        for k, c in enumerate(contexts):
            groups.setdefault(c, []).append(k)
        min_share = self.cfg.share_context_min
        shared = [ks for ks in groups.values() if min_share and len(ks) >= min_share]
        alone = [k for ks in groups.values() if not (min_share and len(ks) >= min_share) for k in ks]
        order = sorted(alone, key=lambda k: len(enc[k][0]) + len(enc[k][1]))
        bs = self.cfg.batch_size
        with self._lock, torch.inference_mode():
            prefix = self._prefix_cache(pre) if pre else None
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                for k, lp in zip(idx, self._score_batch([enc[k] for k in idx], prefix)):
                    out[k] = lp
                advance(progress, len(idx))
            # contexts shared by several continuations (one source item, its candidates): each
            # context runs once; several contexts share one forward pass, and their continuations
            # (up to ROWS_PER_CONTEXT_PASS batches of them) are sorted by length before batching,
            # so rows of similar length share a batch (ML-100K Swing pairs: 1.42x padded tokens
            # when each pass's continuations formed one batch)
            shared.sort(key=lambda ks: len(enc[ks[0]][0]))
            chunk: list[list[int]] = []
            rows_cap = ROWS_PER_CONTEXT_PASS * bs
            for ks in shared + [[]]:
                if chunk and (not ks or len(chunk) + 1 > bs or sum(map(len, chunk)) + len(ks) > rows_cap):
                    for k, lp in self._score_groups([enc[g[0]][0] for g in chunk],
                                                    [[(k, enc[k][1]) for k in g] for g in chunk],
                                                    prefix).items():
                        out[k] = lp
                    advance(progress, sum(map(len, chunk)))
                    chunk = []
                if ks:
                    chunk.append(ks)
        return out  # type: ignore[return-value]

    def _prefix_cache(self, pre: list[int]) -> _Prefix:
        import torch

        cache = self.model.model(input_ids=torch.tensor([pre], device=self.device), use_cache=True).cache
        return _Prefix(len(pre), cache, self.shared_prefix)

    def _run_on_prefix(self, seqs: list[list[int]], prefix: _Prefix | None) -> tuple[Any, Any, Any, Any]:
        """One forward of ``seqs`` right-padded after the prefix (None: none), positions continuing
        it. Returns (hidden (n, width, H), the rows' cache, the attention mask (n, m + width) over
        it, lengths (n,)), all on the device; m is the prefix's length where the rows' cache holds a
        copy of it, else 0 (``_Prefix.past_for``)."""

        import torch

        dev = self.device
        n_pre = prefix.n if prefix else 0
        past, m = prefix.past_for(len(seqs)) if prefix else (None, 0)
        lens = torch.tensor([len(x) for x in seqs])
        width = int(lens.max())
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(seqs), m + width), dtype=torch.long)
        att[:, :m] = 1
        for r, x in enumerate(seqs):
            ids[r, :len(x)] = torch.tensor(x)
            att[r, m:m + len(x)] = 1
        kw: dict[str, Any] = {"use_cache": True}
        if past is not None:
            kw["cache"] = past
        pos = (n_pre + torch.arange(width))[None].expand(len(seqs), -1)
        res = self._forward(prefix, input_ids=ids.to(dev), attention_mask=att.to(dev), position_ids=pos.to(dev), **kw)
        return res.last_hidden_state, res.cache, att.to(dev), lens.to(dev)

    def _token_logprobs(self, hidden: Any, targets: list[int]) -> np.ndarray:
        """log P(target_i | state_i) for hidden states (n, H) and n target ids -> (n,) float64;
        the LM head runs on these rows only."""
        import torch

        logits = self.model.lm_head(hidden).float()                   # (n, vocab)
        tgt = torch.tensor(targets, device=self.device)[:, None]
        out = torch.empty(len(targets), dtype=torch.float32, device=self.device)
        # the log-softmax in blocks of rows that stay in the CPU's cache: the same numbers, ~2x faster
        # than over the whole (n, 49k) matrix at once (SmolLM2, float32 on 2 AVX2 cores)
        for s in range(0, len(targets), LOGSOFTMAX_ROWS):
            block = slice(s, s + LOGSOFTMAX_ROWS)
            out[block] = torch.log_softmax(logits[block], dim=-1).gather(1, tgt[block])[:, 0]
        return out.cpu().numpy().astype(np.float64)

    def _run_rows(self, seqs: list[list[int]], prefix: _Prefix | None, context: _Context | None = None,
                  group: Any = None, keep: bool = False) -> tuple[Any, _Context | None]:
        """One forward of token rows after the prefix, row r after context ``group[r]`` of
        ``context`` where one is given (positions continuing it). Packed where the prefix
        attention runs (``shared_prefix``; ``_run_packed``), else right-padded on key/value caches.
        Returns (the hidden states of every row's tokens, row after row (sum of lengths, H); with
        ``keep``, the rows as a ``_Context`` for later rows)."""
        import torch

        dev = self.device
        lens_cpu = torch.tensor([len(x) for x in seqs])      # the packed path builds its mask on the CPU
        lens = lens_cpu.to(dev)
        if self.shared_prefix:
            start = (prefix.n if prefix else 0) + (context.lens[group] if context is not None else 0)
            hidden, kept = self._run_packed(seqs, lens_cpu, start, prefix, context, group, keep)
            if not keep:
                return hidden, None
            return hidden, _Context(hidden[lens.cumsum(0) - 1], lens, kv=[kept[i] for i in range(len(kept))])
        if context is None:
            hidden, cache, att, _ = self._run_on_prefix(seqs, prefix)
        else:
            hidden, cache, att, _ = self._run_on_groups(seqs, group, context.cache, context.att, context.lens, prefix)
        r_idx = torch.arange(len(seqs), device=dev).repeat_interleave(lens)
        t_idx = torch.arange(int(lens.sum()), device=dev) - (lens.cumsum(0) - lens).repeat_interleave(lens)
        states = hidden[r_idx, t_idx]
        return states, (_Context(hidden[torch.arange(len(seqs), device=dev), lens - 1], lens, cache=cache, att=att)
                        if keep else None)

    def _run_packed(self, seqs: list[list[int]], lens: Any, start: Any, prefix: _Prefix | None,
                    context: _Context | None, group: Any, keep: bool) -> tuple[Any, dict[int, tuple[Any, Any]] | None]:
        """``_run_rows`` packed: the rows concatenated into one sequence (batch 1), row r's token t at
        position ``start[r] + t`` (``lens`` (R,): the rows' lengths, on the CPU, where the mask is
        built), so the linear layers run no padding; ``prefix_attention`` unpacks
        them for their own attention only (``prefix_attention.Packed``). Returns (hidden (T, H), the
        rows' keys/values per layer as padded (R, kv_heads, width, head_dim) if ``keep``)."""
        import torch

        from qarm_core.lm import prefix_attention

        dev = self.device
        rows, width = len(seqs), int(lens.max())
        ids = torch.full((rows, width), self.tokenizer.pad_token_id, dtype=torch.long)
        for r, x in enumerate(seqs):
            ids[r, :len(x)] = torch.tensor(x)
        pos = torch.as_tensor(start).cpu().reshape(-1, 1) + torch.arange(width)[None]
        # the padded batch's mask over [context; own] keys, made once for every layer: causal over
        # the row's own tokens, none of its padding; its context's tokens but their padding
        own = torch.ones(width, width, dtype=torch.bool).tril()[None] & \
            (torch.arange(width)[None, None] < lens[:, None, None])        # (R, width, width)
        if context is not None:
            c_ok = torch.arange(context.kv[0][0].shape[2]) < context.lens.cpu()[:, None]   # (G, Lc)
            own = torch.cat([c_ok[group.cpu()][:, None].expand(-1, width, -1), own], 2)
        mask = torch.zeros(own.shape, dtype=self.dtype).masked_fill_(~own, float("-inf"))[:, None]
        hidden, packed = prefix_attention.forward_packed(
            self.model.model, ids.to(dev), pos.expand(rows, -1).to(dev), lens, mask.to(dev),
            prefix.kv if prefix is not None else None, context.kv if context is not None else None, group, keep)
        return hidden, packed.kept

    def _score_groups(self, ctxs: list[list[int]], conts: list[list[tuple[int, list[int]]]],
                      prefix: _Prefix | None) -> dict[int, np.ndarray]:
        """Log-probs of continuations grouped by context: ``conts[g]`` = [(request index, token
        ids), ...] all follow ``ctxs[g]``. One forward runs the G contexts (on the prefix); then
        the continuations run in batches of ``batch_size``, each row after its own context
        (``_run_rows``), so the result equals scoring context + continuation in one sequence.
        Returns {request index: (len(tokens),) float64}."""

        import torch

        dev = self.device
        _, ctx = self._run_rows(ctxs, prefix, keep=True)
        rows = sorted(((g, k, x) for g, cs in enumerate(conts) for k, x in cs), key=lambda r: (len(r[2]), r[0], r[1]))
        out: dict[int, np.ndarray] = {}
        bs = self.cfg.batch_size
        for s in range(0, len(rows), bs):
            batch = rows[s:s + bs]
            gi = torch.tensor([g for g, _, _ in batch], device=dev)
            # token 0 of a continuation is predicted by its context's last state, token t by position
            # t-1: a row runs all its tokens but the last, whose state predicts nothing
            seqs = [x[:-1] for _, _, x in batch if len(x) > 1]
            picked = ctx.last[gi]
            if seqs:
                ran = torch.tensor([g for g, _, x in batch if len(x) > 1], device=dev)
                picked = torch.cat([picked, self._run_rows(seqs, prefix, ctx, ran)[0]])
            tok_lp = self._token_logprobs(picked, [x[0] for _, _, x in batch] + [t for _, _, x in batch for t in x[1:]])
            first, rest, at = tok_lp[:len(batch)], tok_lp[len(batch):], 0
            for r, (_, k, x) in enumerate(batch):
                out[k] = np.concatenate([first[r:r + 1], rest[at:at + len(x) - 1]])
                at += len(x) - 1
        return out

    def _score_batch(self, batch: list[tuple[list[int], list[int]]], prefix: _Prefix | None = None) -> list[np.ndarray]:
        """Log-probs of (context, continuation) token lists, each run as one row (``_run_rows``):
        its context and continuation but the continuation's last token, whose state predicts nothing.
        Returns [(len(continuation),) float64, ...]."""
        import torch

        states, _ = self._run_rows([a + b[:-1] for a, b in batch], prefix)
        picked, targets, at = [], [], 0
        for a, b in batch:
            picked += range(at + len(a) - 1, at + len(a) + len(b) - 1)   # position t predicts token t+1
            targets += b
            at += len(a) + len(b) - 1
        tok_lp = self._token_logprobs(states[torch.tensor(picked, device=self.device)], targets)
        out, at = [], 0
        for _, b in batch:
            out.append(tok_lp[at:at + len(b)].astype(np.float64))
            at += len(b)
        return out

    # -- generation
    def chat_prompt(self, user: str, system: str | None = None) -> str:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    @keep_freed_memory()
    def generate(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int | None = None,
                 system: str | None = None, progress: Progress | None = None) -> list[str]:
        """Greedy completions of chat turns; ``prompts`` are user messages. n prompts -> n strings.
        ``progress`` advances by the prompts of each finished batch."""
        import torch

        tok = self.tokenizer
        ids = [tok(self.chat_prompt(p, system), add_special_tokens=False).input_ids for p in prompts]
        with self._lock, torch.inference_mode():
            gens = self.greedy_token_ids(ids, max_new_tokens, batch_size or self.cfg.batch_size, progress)
        return [tok.decode(g, skip_special_tokens=True).strip() for g in gens]

    def _stop_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        return set(eos if isinstance(eos, (list, tuple)) else [eos])

    def greedy_token_ids(self, prompts: list[list[int]], max_new_tokens: int, bs: int,
                progress: Progress | None = None) -> list[list[int]]:
        """Greedy continuations (token ids, stop token excluded) of tokenised prompts; what
        transformers' ``generate(do_sample=False)`` gives, at less cost on a CPU:

        * the prompts' longest common token prefix (the chat template and system turn) runs once
          and its key/value cache is shared by every row;
        * prompts that share a longer prefix among themselves (the questions about one item: the
          item's text comes before the question) form groups of ``share_context_min`` to ``bs``
          prompts where that saves more than ``MIN_GROUP_PREFIX`` tokens (``prefix_groups``): each
          group's prefix runs once, several groups per forward pass, and its rows run only their
          own tokens on its key/value cache;
        * each batch runs its rows' own tokens right-padded on that cache (padding slots masked,
          positions continuing each row), and the LM head runs only on each row's last position;
        * a row leaves the batch as soon as it emits a stop token, so short answers cost only the
          steps they need instead of the batch's longest.
        """
        import torch

        if not prompts:
            return []
        n_pre = min(len(x) for x in prompts) - 1          # every row keeps >= 1 token of its own
        for x in prompts[1:]:
            n_pre = min(n_pre, _common_prefix(prompts[0], x))
        prefix = self._prefix_cache(prompts[0][:n_pre]) if n_pre else None
        out: list[list[int]] = [[] for _ in prompts]
        groups = prefix_groups(prompts, n_pre, self.cfg.share_context_min, MIN_GROUP_PREFIX, bs)
        alone = sorted((g[0] for p, g in groups if not p), key=lambda i: len(prompts[i]))
        for s in range(0, len(alone), bs):
            rows = alone[s:s + bs]
            hidden, past, att, lens = self._run_on_prefix([prompts[i][n_pre:] for i in rows], prefix)
            h = hidden[torch.arange(len(rows), device=self.device), lens - 1]      # (rows, H)
            self._decode(prompts, rows, h, past, att, n_pre + lens, max_new_tokens, out, prefix)
            advance(progress, len(rows))
        shared = sorted(((p, g) for p, g in groups if p), key=lambda pg: (pg[0], len(pg[1])))   # each <= bs rows
        batch: list[tuple[int, list[int]]] = []
        for pg in shared + [(0, [])]:
            if batch and (not pg[1] or sum(len(g) for _, g in batch) + len(pg[1]) > bs):
                rows = [i for _, g in batch for i in g]
                h, past, att, nxt_pos = self._run_groups(prompts, batch, prefix, n_pre)
                self._decode(prompts, rows, h, past, att, nxt_pos, max_new_tokens, out, prefix)
                advance(progress, len(rows))
                batch = []
            if pg[1]:
                batch.append(pg)
        return out

    def _run_groups(self, prompts: list[list[int]], batch: list[tuple[int, list[int]]], prefix: _Prefix | None,
                    n_pre: int) -> tuple[Any, Any, Any, Any]:
        """Prefill of grouped prompts: ``batch`` = [(p, row indices), ...], the rows of a group
        sharing tokens ``n_pre:n_pre + p``. One forward runs the G group prefixes (right-padded, on
        the common ``n_pre``-token cache), a second runs every row's remaining tokens on its own
        group's cache. Returns (hidden state at each row's last token (rows, H), the rows' cache,
        their attention mask over it, each row's next position (rows,))."""
        import torch

        dev = self.device
        _, g_cache, g_att, g_lens = self._run_on_prefix([prompts[g[0]][n_pre:n_pre + p] for p, g in batch], prefix)
        gi = torch.tensor([j for j, (_, g) in enumerate(batch) for _ in g], device=dev)
        own = [prompts[i][n_pre + p:] for p, g in batch for i in g]
        hidden, past, att, nxt_pos = self._run_on_groups(own, gi, g_cache, g_att, g_lens, prefix)
        lens = torch.tensor([len(x) for x in own], device=dev)
        return hidden[torch.arange(len(own), device=dev), lens - 1], past, att, nxt_pos

    def _run_on_groups(self, seqs: list[list[int]], gi: Any, g_cache: Any, g_att: Any, g_lens: Any,
                       prefix: _Prefix | None) -> tuple[Any, Any, Any, Any]:
        """One forward of ``seqs`` (right-padded), row r on the cache of group ``gi[r]``: ``g_cache``
        holds the groups' tokens after the ``n_pre``-token prefix (right-padded, ``g_att`` their mask,
        ``g_lens`` their lengths), so the padding slots are masked and positions continue each group.
        Returns (hidden (rows, width, H), the rows' cache, its attention mask (rows, n_pre + group
        width + width), each row's next position (rows,))."""
        import torch

        dev = self.device
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, x in enumerate(seqs):
            ids[r, :len(x)] = torch.tensor(x)
            att[r, :len(x)] = 1
        past = _view_of(g_cache)
        past.batch_select_indices(gi)
        att = torch.cat([g_att[gi], att.to(dev)], 1)
        start = (prefix.n if prefix else 0) + g_lens[gi]
        pos = start[:, None] + torch.arange(width, device=dev)[None]
        res = self._forward(prefix, input_ids=ids.to(dev), attention_mask=att, position_ids=pos, cache=past,
                            use_cache=True)
        return res.last_hidden_state, res.cache, att, start + torch.tensor([len(x) for x in seqs], device=dev)

    def _decode(self, prompts: list[list[int]], rows: list[int], h: Any, past: Any, att: Any, nxt_pos: Any,
                max_new_tokens: int, out: list[list[int]], prefix: _Prefix | None) -> None:
        """Greedy steps for ``rows`` (prompt indices) from the hidden state of their last prompt
        token ``h`` (rows, H), their cache ``past`` (after ``prefix``), its attention mask ``att`` and
        their next positions ``nxt_pos`` (rows,); appends each row's tokens to ``out[row]``."""
        import torch

        dev = self.device
        head = self.model.lm_head
        stop, penalty = self._stop_ids(), self.cfg.repetition_penalty
        seen = [set(prompts[i]) for i in rows] if penalty != 1.0 else []
        alive = list(range(len(rows)))             # batch slot -> row of this batch
        for step in range(max_new_tokens):
            logits = head(h).float()
            if penalty != 1.0:                      # as transformers' RepetitionPenaltyLogitsProcessor
                for j, r in enumerate(alive):
                    idx = torch.tensor(sorted(seen[r]), device=dev)
                    v = logits[j, idx]
                    logits[j, idx] = torch.where(v < 0, v * penalty, v / penalty)
            nxt = logits.argmax(-1).tolist()
            keep = [j for j, t in enumerate(nxt) if t not in stop]
            for j in keep:
                out[rows[alive[j]]].append(nxt[j])
                if seen:
                    seen[alive[j]].add(nxt[j])
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(alive):
                sel = torch.tensor(keep, device=dev)
                past.batch_select_indices(sel)
                att, nxt_pos = att[sel], nxt_pos[sel]
                alive = [alive[j] for j in keep]
            att = torch.cat([att, torch.ones((len(alive), 1), dtype=att.dtype, device=dev)], 1)
            res = self._forward(prefix, input_ids=torch.tensor([nxt[j] for j in keep], device=dev)[:, None],
                                attention_mask=att, position_ids=nxt_pos[:, None], cache=past, use_cache=True)
            h, past, nxt_pos = res.last_hidden_state[:, -1], res.cache, nxt_pos + 1


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    k, n = 0, min(len(a), len(b))
    while k < n and a[k] == b[k]:
        k += 1
    return k


def prefix_groups(prompts: list[list[int]], n_pre: int, min_rows: int, min_tokens: int,
                  max_rows: int | None = None) -> list[tuple[int, list[int]]]:
    """Prompts (token lists, all sharing their first ``n_pre`` tokens) grouped by a longer shared
    prefix: [(p, indices), ...], the prompts of a group sharing tokens ``n_pre:n_pre + p``, each
    keeping at least one token of its own; p = 0 for a prompt alone. A group has ``min_rows`` to
    ``max_rows`` prompts (``min_rows`` 0: no groups) and p >= ``min_tokens``.

    In token order a group is a run of prompts, whose shared prefix is the shortest common prefix
    of neighbours in it. Of all ways to cut the order into runs, the one that saves the most tokens
    is taken (a group of m prompts saves (m - 1) p tokens, less ``min_tokens`` for its extra pass, so
    a group is formed only where that is more than 0):
    the questions about one item share the item's text (the longer prefix two of its questions
    share, e.g. "What", or the shorter one of items whose titles begin alike, saves less)."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i][n_pre:])
    n = len(order)
    cap = n if max_rows is None else max(1, max_rows)
    own = [len(prompts[i]) - 1 - n_pre for i in order]                  # the most a row can share
    lcp = [_common_prefix(prompts[order[j]], prompts[order[j + 1]]) - n_pre for j in range(n - 1)]
    best = [0] * (n + 1)            # best[e]: tokens saved by the first e prompts of the order
    cut: list[tuple[int, int]] = [(0, 0)] * (n + 1)                     # (start of the last run, its p)
    for e in range(1, n + 1):
        best[e], cut[e] = best[e - 1], (e - 1, 0)
        p = own[e - 1]
        for s in range(e - 2, max(-1, e - 1 - cap), -1):                # the run order[s:e]
            p = min(p, lcp[s], own[s])
            if p < min_tokens:
                break
            gain = best[s] + (e - 1 - s) * p - min_tokens
            if min_rows and e - s >= min_rows and gain > best[e]:
                best[e], cut[e] = gain, (s, p)
    out: list[tuple[int, list[int]]] = []
    e = n
    while e > 0:
        s, p = cut[e]
        out.append((p, order[s:e]) if p else (0, [order[e - 1]]))
        e = s if p else e - 1
    return out[::-1]
