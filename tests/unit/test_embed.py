"""The three-segment embedding model: mask, losses, data, tiny_catalog embedding, evaluation, bad input.

Everything runs on a tiny random llama (``lm.tiny.make_tiny_causal_lm``); seconds per test.
Training tests are in test_embed_train.py.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qarm_core.embed.config import EmbedConfig, EmbedModelConfig, TrainConfig
from qarm_core.errors import DataError

def _cfg(path, **kw) -> EmbedModelConfig:
    return EmbedModelConfig(model=str(path), dim=16, **kw)


# ---------------------------------------------------------------- mask
def test_attention_bias_pattern():
    import torch

    from qarm_core.embed.model import build_attention_bias

    # item item EMB EMB qa qa pad
    seg = torch.tensor([[1, 1, 2, 2, 3, 3, 0]])
    neg = torch.finfo(torch.float32).min
    for scale, qa_item in ((1.0, 0.0), (0.25, float(np.log(0.25))), (0.0, neg)):
        b = build_attention_bias(seg, scale, torch.float32)[0, 0]
        allowed = b > neg
        # item: causal among items only
        assert allowed[0].tolist() == [True, False, False, False, False, False, False]
        assert allowed[1].tolist() == [True, True, False, False, False, False, False]
        # EMB: the item segment and earlier EMB tokens, never QA
        assert allowed[2].tolist() == [True, True, True, False, False, False, False]
        assert allowed[3].tolist() == [True, True, True, True, False, False, False]
        # QA: EMB and earlier QA at 0, item at log(scale)
        assert b[5, 2:6].tolist() == [0.0, 0.0, 0.0, 0.0]
        assert b[5, :2].tolist() == pytest.approx([qa_item, qa_item])
        assert not allowed[:6, 6].any()                    # nobody attends to padding
    with pytest.raises(ValueError):
        build_attention_bias(seg, 1.5, torch.float32)


def test_anneal_schedule():
    from qarm_core.embed.model import anneal_scale

    assert [anneal_scale(s, 4) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert anneal_scale(0, 0) == 0.0


def _batch(loaded, item, qa, answer_flags=None):
    from qarm_core.embed.data import EncodedItem, collate

    flags = tuple(answer_flags or [False] + [True] * (len(qa) - 1))
    return collate([EncodedItem(tuple(item), tuple(qa), flags)], loaded.emb_token_ids,
                   loaded.tokenizer.pad_token_id, with_qa=True)


@pytest.mark.parametrize("impl", ["auto", "packed", "sdpa", "eager"])
def test_qa_tokens_do_not_change_the_embedding(tiny_lm_path, impl):
    import torch

    from qarm_core.embed.data import EncodedItem, collate
    from qarm_core.embed.model import load_model
    from qarm_core.lm.prefix_attention import NAME_EAGER

    loaded = load_model(_cfg(tiny_lm_path, attn_implementation=impl))
    assert loaded.model.lm.config._attn_implementation == (NAME_EAGER if impl in ("auto", "packed") else impl)
    assert loaded.model.packing == (impl if impl in ("auto", "packed") else None)
    item = [11, 12, 13, 14, 15]
    with torch.no_grad():
        embs = [loaded.model(**_batch(loaded, item, qa), qa_item_scale=s)["emb"]
                for qa in ([20, 21, 22], [40, 41, 42], [7, 8, 9]) for s in (1.0, 0.5, 0.0)]
        no_qa = collate([EncodedItem(tuple(item))], loaded.emb_token_ids, loaded.tokenizer.pad_token_id, False)
        alone = loaded.model(**no_qa)["emb"]
        other = loaded.model(**_batch(loaded, [11, 12, 99, 14, 15], [20, 21, 22]))["emb"]
    for e in embs[1:]:
        torch.testing.assert_close(e, embs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(alone, embs[0], rtol=0, atol=1e-5)   # inference needs no QA segment
    assert (other - embs[0]).abs().max() > 1e-3                       # ... but the item does matter
    assert embs[0].shape == (1, 16)
    assert float(embs[0].norm()) == pytest.approx(1.0, abs=1e-5)


def test_auto_packs_float32_training_on_a_cpu_only(tiny_lm_path):
    """``attn_implementation: auto`` packs a training forward in float32; not inference, not bf16
    (autocast or bf16 weights), not under gradient checkpointing; ``packed`` packs inference too;
    eager never."""
    import torch

    from qarm_core.embed.model import load_model

    ids = torch.zeros(2, 3, dtype=torch.long)
    auto = load_model(_cfg(tiny_lm_path, attn_implementation="auto")).model
    assert auto.packs(ids)
    with torch.no_grad():
        assert not auto.packs(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not auto.packs(ids)
    always = load_model(_cfg(tiny_lm_path, attn_implementation="packed")).model
    with torch.no_grad():
        assert always.packs(ids)
    assert not load_model(_cfg(tiny_lm_path, attn_implementation="eager")).model.packs(ids)
    assert not load_model(_cfg(tiny_lm_path, attn_implementation="auto"), dtype=torch.bfloat16).model.packs(ids)
    auto.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not auto.packs(ids)


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0])
def test_packed_rows_give_the_padded_batch_and_its_gradients(tiny_lm_path, scale):
    """Rows of different lengths run packed (no padding through the linear layers) give the
    embeddings, the QA loss and the gradients of the padded batch (eager attention), also under
    gradient checkpointing (which runs padded)."""
    import torch

    from qarm_core.embed.data import EncodedItem, collate
    from qarm_core.embed.model import load_model

    items = [EncodedItem((11, 12, 13), (20, 21, 22, 23, 24), (False, True, True, True, True)),
             EncodedItem((14, 15, 16, 17, 18, 19), (25, 26), (False, True)),
             EncodedItem((30,), (), ()),
             EncodedItem((31, 32, 33, 34), (40, 41, 42), (False, False, True))]

    def run(impl, checkpointing=False):
        loaded = load_model(_cfg(tiny_lm_path, attn_implementation=impl))
        model = loaded.model.train()
        if checkpointing:
            model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        batch = collate(items, loaded.emb_token_ids, loaded.tokenizer.pad_token_id, with_qa=True)
        out = model(**batch, qa_item_scale=scale)
        (out["emb"].square().sum() + out["qa_loss_sum"]).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out["emb"].detach(), out["qa_loss_sum"].detach(), grads

    emb, qa, grads = run("eager")
    for impl, ckpt in (("packed", False), ("packed", True)):
        emb_p, qa_p, grads_p = run(impl, ckpt)
        torch.testing.assert_close(emb_p, emb, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(qa_p, qa, rtol=1e-4, atol=1e-4)
        assert grads_p.keys() == grads.keys() and len(grads) > 10
        for n in grads:
            torch.testing.assert_close(grads_p[n], grads[n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("impl", ["packed", "sdpa", "eager"])
def test_after_annealing_item_reaches_qa_only_through_emb(tiny_lm_path, impl):
    """Run item A, record every decoder layer's output at the EMB positions; run item B (same
    length) with those EMB states patched in. With QA->item attention annealed to zero, B's QA
    logits equal A's: the item reaches QA only through EMB. Before annealing they differ."""
    import torch

    from qarm_core.embed.model import load_model

    loaded = load_model(_cfg(tiny_lm_path, attn_implementation=impl))
    model = loaded.model
    qa = [30, 31, 32, 33, 34]
    ba, bb = _batch(loaded, [11, 12, 13, 14], qa), _batch(loaded, [50, 60, 70, 80], qa)
    emb_pos = ba["emb_pos"][0]
    qa_pos = (ba["segment"][0] == 3).nonzero()[:, 0]

    def qa_logits(batch, scale, record=None, patch=None):
        hooks = []
        for li, layer in enumerate(model.lm.model.layers):
            def hook(mod, args, out, li=li):
                h = out[0] if isinstance(out, tuple) else out
                if record is not None:
                    record[li] = h[:, emb_pos].clone()
                if patch is not None:
                    h = h.clone()
                    h[:, emb_pos] = patch[li]
                    return (h, *out[1:]) if isinstance(out, tuple) else h
                return None
            hooks.append(layer.register_forward_hook(hook))
        try:
            with torch.no_grad():
                h = model.hidden(batch["input_ids"], batch["segment"], scale)
                return model.lm.lm_head(h[0, qa_pos])
        finally:
            for hk in hooks:
                hk.remove()

    for scale, same in ((0.0, True), (1.0, False), (0.5, False)):
        rec: dict = {}
        la = qa_logits(ba, scale, record=rec)
        lb_patched = qa_logits(bb, scale, patch=rec)
        lb = qa_logits(bb, scale)
        assert (lb - la).abs().max() > 1e-3               # the item does reach QA (through EMB)
        diff = float((lb_patched - la).abs().max())
        assert (diff < 1e-5) if same else (diff > 1e-3), (scale, diff)


def test_new_tokens_and_reload(tiny_lm_path, tmp_path):
    import torch

    from qarm_core.embed.model import load_model, save_model

    cfg = _cfg(tiny_lm_path, n_emb_tokens=3)
    a = load_model(cfg)
    assert a.tokenizer.convert_ids_to_tokens(list(a.emb_token_ids)) == ["<EMB_1>", "<EMB_2>", "<EMB_3>"]
    rows = a.model.lm.get_input_embeddings().weight[list(a.emb_token_ids)]
    assert torch.isfinite(rows).all() and (rows[0] - rows[1]).abs().max() > 0
    # a projection seeded by the config: two loads agree
    b = load_model(cfg)
    torch.testing.assert_close(a.model.proj.weight, b.model.proj.weight)
    # save -> load as fine-tuned, same outputs
    out = save_model(a.model, a.tokenizer, tmp_path / "m", {"n_emb_tokens": 3, "dim": 16, "model_version": "v1"})
    c = load_model(_cfg(out, n_emb_tokens=3))
    assert c.fine_tuned and c.model_version == "v1" and c.emb_token_ids == a.emb_token_ids
    batch = _batch(a, [11, 12, 13], [20, 21])
    with torch.no_grad():
        torch.testing.assert_close(c.model(**batch)["emb"], a.model(**batch)["emb"])
    with pytest.raises(DataError, match="dim=16"):
        load_model(EmbedModelConfig(model=str(out), n_emb_tokens=3, dim=32))
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))      # no pickles


# ---------------------------------------------------------------- losses
def test_info_nce_and_duplicate_masking():
    import torch

    from qarm_core.embed.losses import info_nce

    x = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert float(info_nce(x, x, 0.01)) < 1e-3                 # aligned pairs, spread out
    rand = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert float(info_nce(x, rand, 0.05)) > 1.0
    # rows 0 and 1 are the same pair of items: without masking each is the other's "negative"
    y = x.clone()
    y[1] = y[0]
    ids = torch.tensor([1, 1, 3, 4, 5, 6])
    unmasked = float(info_nce(y, y, 0.01))
    masked = float(info_nce(y, y, 0.01, ids, ids))
    assert unmasked > 0.2 and masked < 1e-3


def test_qa_loss_only_on_answer_tokens(tiny_lm_path):
    import torch

    from qarm_core.embed.model import load_model

    loaded = load_model(_cfg(tiny_lm_path))
    b = _batch(loaded, [11, 12, 13], [20, 21, 22, 23], [False, False, True, True])
    assert b["labels"][0].tolist()[-4:] == [-100, -100, 22, 23]
    with torch.no_grad():
        out = loaded.model(**b, qa_item_scale=0.0)
    assert float(out["qa_tokens"]) == 2.0
    # reference: the same NLL from full logits under the three-segment mask
    h = loaded.model.hidden(b["input_ids"], b["segment"], 0.0)
    ref = torch.nn.functional.cross_entropy(loaded.model.lm.lm_head(h[0, -3:-1]), torch.tensor([22, 23]), reduction="sum")
    torch.testing.assert_close(out["qa_loss_sum"], ref.float(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- data
def test_pairs_split_and_batches(tiny_catalog):
    from qarm_core.embed.data import batch_pair_indices, positive_pairs, split_pairs

    items, judgments, _ = tiny_catalog
    a, p = positive_pairs(judgments, items["item_id"].to_numpy(), "train")
    assert len(a) == 4 * (6 * 5 // 2)                         # unordered same-genre pairs; rejected pair gone
    assert ((a - 1) % 4 == (p - 1) % 4).all() and (a < p).all()
    train, held = split_pairs(judgments, 0.3, seed=0)
    key = lambda t: {tuple(sorted(x)) for x in zip(t["src_item"].to_pylist(), t["dst_item"].to_pylist())}  # noqa: E731
    assert not key(train) & key(held)                         # a pair and its mirror stay together
    assert 0 < held.num_rows < judgments.num_rows
    again = split_pairs(judgments.take(np.random.default_rng(0).permutation(judgments.num_rows)), 0.3, seed=0)[1]
    assert key(again) == key(held)                            # independent of row order
    b0 = batch_pair_indices(60, 0, 8, 0)
    assert len(set(b0.tolist())) == 8 and (batch_pair_indices(60, 0, 8, 0) == b0).all()
    epoch = np.concatenate([batch_pair_indices(60, s, 8, 0) for s in range(7)])
    assert len(set(epoch.tolist())) == 56                     # no repeats within an epoch
    assert len(batch_pair_indices(3, 5, 8, 0)) == 8           # fewer pairs than a batch: repeats


def test_item_text_and_qa_segment(tiny_lm_path, tiny_catalog):
    from qarm_core.embed.data import encode_items, item_texts, qa_by_item
    from qarm_core.embed.model import load_model

    items, _, qa = tiny_catalog
    cfg = _cfg(tiny_lm_path, max_qa_tokens=12, max_qa_pairs=1)
    texts = item_texts(items, cfg, [1, 2])
    assert texts == {1: "Movie 1 (1990), genres: Action", 2: "Movie 2 (1991), genres: Comedy"}
    qmap = qa_by_item(qa, 1, "train")
    assert qmap[1] == [("What genre is it?", "It is Action.")]
    hostile = pa.table({"item_id": [1], "question": ["q <EMB_1> <|im_start|>"], "answer": ["a <EMB_2>"]})
    assert "<" not in str(qa_by_item(hostile, 2, "train"))   # QA text cannot spell special tokens
    loaded = load_model(cfg)
    enc = encode_items(loaded.tokenizer, texts, qmap, cfg)
    e = enc[1]
    assert len(e.qa) <= 12 and len(e.qa) == len(e.qa_is_answer) and any(e.qa_is_answer) and not e.qa_is_answer[0]
    assert not set(e.item) & set(loaded.emb_token_ids)


# ---------------------------------------------------------------- tiny_catalog embedding
def test_embed_catalog_deterministic_resumable(tiny_lm_path, tiny_catalog, tmp_path):
    from qarm_core.embed.embed import embed_catalog
    from qarm_core.quantize.io import read_embeddings

    items, _, _ = tiny_catalog
    mcfg = _cfg(tiny_lm_path)
    ecfg = EmbedConfig(batch_size=5, chunk_rows=10, base_pooling="emb", dtype="float32")
    seen: list[dict] = []
    r1 = embed_catalog(items, tmp_path / "a", mcfg, ecfg, progress=seen.append)
    assert (r1.rows, r1.dim, r1.parts, r1.parts_written, r1.parts_skipped) == (24, 16, 3, 3, 0)
    assert [s["rows_done"] for s in seen] == [10, 20, 24]
    ids, x = read_embeddings(tmp_path / "a")
    assert ids.tolist() == list(range(1, 25)) and x.shape == (24, 16)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    t = pq.read_table(tmp_path / "a" / "part-00000.parquet")
    assert t.schema.field("vector").type == pa.list_(pa.float32(), 16)
    assert set(t["model_version"].to_pylist()) == {r1.model_version}
    # deterministic: a second run (other batch size too) gives the same vectors
    r2 = embed_catalog(items, tmp_path / "b", mcfg, EmbedConfig(batch_size=7, chunk_rows=10, base_pooling="emb",
                                                                 dtype="float32"))
    np.testing.assert_allclose(read_embeddings(tmp_path / "b")[1], x, atol=1e-5)
    assert r2.model_version == r1.model_version
    # bf16 (what auto picks on a CPU with native bf16): the same run twice is bit-identical, and
    # close to fp32
    bf = [read_embeddings(embed_catalog(items, tmp_path / f"bf{i}", mcfg,
                                        EmbedConfig(batch_size=5, chunk_rows=10, base_pooling="emb",
                                                    dtype="bfloat16")).path)[1]
          for i in range(2)]
    np.testing.assert_array_equal(bf[0], bf[1])
    assert np.abs(bf[0] - x).max() < 0.05
    # resumable: a lost part is recomputed, the others skipped
    (tmp_path / "a" / "part-00001.parquet").unlink()
    r3 = embed_catalog(items, tmp_path / "a", mcfg, ecfg)
    assert (r3.parts_written, r3.parts_skipped) == (1, 2)
    np.testing.assert_array_equal(read_embeddings(tmp_path / "a")[1], x)
    # another chunking clears the folder instead of mixing parts
    r4 = embed_catalog(items, tmp_path / "a", mcfg, EmbedConfig(batch_size=5, chunk_rows=100, base_pooling="emb",
                                                                dtype="float32"))
    assert (r4.parts, r4.parts_written) == (1, 1) and len(list((tmp_path / "a").glob("part-*"))) == 1
    assert json.loads((tmp_path / "a" / "_embed_meta.json").read_text())["chunk_rows"] == 100


def test_daily_run_encodes_only_new_and_changed_items(tiny_lm_path, tiny_catalog, tmp_path):
    """Carry-over keyed by (model version, text hash): a renamed item and a new item are encoded,
    every other vector is yesterday's, bit for bit; another model version reuses nothing."""
    import pyarrow.compute as pc

    from qarm_core.embed.embed import PreviousEmbeddings, embed_catalog
    from qarm_core.quantize.io import read_embeddings

    items, _, _ = tiny_catalog
    mcfg, ecfg = _cfg(tiny_lm_path), EmbedConfig(batch_size=5, chunk_rows=10, base_pooling="emb", dtype="float32")
    day0 = embed_catalog(items, tmp_path / "d0", mcfg, ecfg)
    assert (day0.encoded, day0.carried_over) == (24, 0)
    t0 = pq.read_table(tmp_path / "d0")
    assert t0["text_hash"].null_count == 0 and len(set(t0["text_hash"].to_pylist())) == 24
    titles = ["Renamed movie" if i == 5 else t for i, t in zip(items["item_id"].to_pylist(), items["title"].to_pylist())]
    day1_items = items.set_column(items.column_names.index("title"), "title", pa.array(titles, pa.string()))
    new = day1_items.slice(0, 1)
    new = new.set_column(0, "item_id", pa.array([100], pa.int64()))
    day1_items = pa.concat_tables([day1_items, new])
    day1 = embed_catalog(day1_items, tmp_path / "d1", mcfg, ecfg, previous=PreviousEmbeddings(tmp_path / "d0"))
    assert (day1.rows, day1.encoded, day1.carried_over) == (25, 2, 23)
    ids0, x0 = read_embeddings(tmp_path / "d0")
    ids1, x1 = read_embeddings(tmp_path / "d1")
    same = ~np.isin(ids1, [5, 100])
    np.testing.assert_array_equal(x1[same], x0[np.searchsorted(ids0, ids1[same])])
    assert not np.array_equal(x1[ids1 == 5], x0[ids0 == 5])
    # a fresh run over day 1 gives the same vectors for the re-encoded items (to float tolerance)
    fresh = embed_catalog(day1_items, tmp_path / "fresh", mcfg, ecfg)
    np.testing.assert_allclose(read_embeddings(fresh.path)[1], x1, atol=1e-5)
    # another model version: nothing is carried over
    other = embed_catalog(day1_items, tmp_path / "other", EmbedModelConfig(model=str(tiny_lm_path), dim=8), ecfg,
                          previous=PreviousEmbeddings(tmp_path / "d1"))
    assert (other.encoded, other.carried_over) == (25, 0)
    # a table written before text hashes existed: nothing is reused
    old = pq.read_table(tmp_path / "d0").drop_columns(["text_hash"])
    (tmp_path / "old").mkdir()
    pq.write_table(old, tmp_path / "old" / "part-00000.parquet")
    assert embed_catalog(items, tmp_path / "d2", mcfg, ecfg, previous=PreviousEmbeddings(tmp_path / "old")).encoded == 24
    assert pc.sum(pc.is_null(pq.read_table(tmp_path / "d2")["text_hash"])).as_py() == 0


def test_base_mean_pooling_and_minilm(tiny_lm_path, tiny_catalog, tmp_path):
    from qarm_core.embed.embed import embed_catalog, embed_catalog_minilm
    from qarm_core.quantize.io import read_embeddings

    items, _, _ = tiny_catalog
    r = embed_catalog(items, tmp_path / "mean", _cfg(tiny_lm_path), EmbedConfig(batch_size=8, base_pooling="mean"))
    assert r.dim == 32 and r.model_version.endswith(":mean")       # hidden size of the tiny llama
    m = embed_catalog_minilm(items, tmp_path / "minilm", EmbedConfig(batch_size=16))
    ids, x = read_embeddings(tmp_path / "minilm")
    assert m.dim == 384 and x.shape == (24, 384) and m.model_version.startswith("minilm:")
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-4)
    # MiniLM knows words: same-genre items are closer than different-genre ones on average
    s = x @ x.T
    g = (ids - 1) % 4
    same = (g[:, None] == g[None, :]) & ~np.eye(24, dtype=bool)
    assert s[same].mean() > s[~same & ~np.eye(24, dtype=bool)].mean()


# ---------------------------------------------------------------- evaluation
def test_retrieval_metrics_by_hand():
    from qarm_core.embed.evaluate import ranks_of_positives, retrieval_metrics

    ids = np.array([10, 20, 30, 40])
    v = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    # from 10: 20 is 1st, 30 is 2nd, 40 3rd
    assert ranks_of_positives(ids, v, np.array([10, 10, 10]), np.array([20, 30, 40])).tolist() == [1, 2, 3]
    m = retrieval_metrics(ids, v, pa.table({"src_item": [10, 10], "dst_item": [30, 20]}), k=1)
    # queries 10->20 (1), 10->30 (2), 20->10 (1), 30->10 (20 scores 0.11 > 0, 40 ties at 0: 2.5)
    assert m.queries == 4 and m.recall_at_k == 0.5 and m.mrr == pytest.approx((1 + 0.5 + 1 + 0.4) / 4)
    # a collapsed embedding gets no credit from ties
    flat = np.ones((4, 2), np.float32) / np.sqrt(2)
    assert ranks_of_positives(ids, flat, np.array([10]), np.array([20])).tolist() == [2.0]
    with pytest.raises(DataError, match="no embedding"):
        ranks_of_positives(ids, v, np.array([10]), np.array([99]))


def test_cooccurrence_pairs_are_consecutive_positives_among_training_items():
    from qarm_core.embed.evaluate import cooccurrence_pairs, recall_report

    ev = pa.table({"user_id": [1, 1, 1, 1, 2, 2, 2, 3, 3], "item_id": [10, 20, 30, 20, 30, 20, 99, 10, 30],
                   "ts": [1, 2, 3, 4, 1, 2, 3, 1, 2], "rating": [5.0, 4.0, 2.0, 5.0, 4.0, 5.0, 5.0, 5.0, 1.0]})
    # user 1 positives 10, 20, 20 (30 rated 2): {10,20}, (20,20) is a self pair; user 2: 30, 20, 99
    # -> {20,30}, {20,99}; 99 never seen in training; user 3 has one positive (and 30 rated 1)
    pairs = cooccurrence_pairs(ev, np.array([10, 20, 30]), 4.0)
    assert pairs.to_pylist() == [{"src_item": 10, "dst_item": 20}, {"src_item": 20, "dst_item": 30}]
    assert cooccurrence_pairs(ev, np.array([10, 20, 30]), None).num_rows == 3     # every event: + {10,30}
    assert cooccurrence_pairs(ev.slice(0, 0), np.array([10]), 4.0).num_rows == 0
    ids = np.array([10, 20, 30, 40])
    v = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], np.float32)
    r = recall_report(ids, v / np.linalg.norm(v, axis=1, keepdims=True), pairs, (1, 2))
    # queries 10->20 (1), 20->10 (1), 20->30 (2: 10 first), 30->20 (1)
    assert r == {"recall_at_1": 0.75, "recall_at_2": 1.0, "mrr": pytest.approx((1 + 1 + 0.5 + 1) / 4), "queries": 4.0}


def test_ranks_are_the_same_in_any_block_size():
    from qarm_core.embed.evaluate import ranks_of_positives

    rng = np.random.default_rng(3)
    ids = rng.permutation(500) + 1000
    # small integers: every score is exact in any summation order, and ties happen
    v = rng.integers(-3, 4, (500, 8)).astype(np.float32)
    q, p = rng.choice(ids, 77), rng.choice(ids, 77)
    want = ranks_of_positives(ids, v, q, p, block=1)
    assert np.array_equal(ranks_of_positives(ids, v, q, p), want)
    assert np.array_equal(ranks_of_positives(ids, v, q, p, block=10), want)


def test_validation_pairs_sample_is_fixed_by_the_pairs_not_their_order():
    """``embed.eval_max_pairs``: every model of a run (the baselines' stage runs apart) is scored on
    the same sample, whatever order the events come in; without a cap, all pairs."""
    from qarm_core.embed.stage import sampled_validation_pairs, validation_pairs

    rng = np.random.default_rng(0)
    n_items, n = 300, 4000
    items = pa.table({"item_id": pa.array(np.arange(n_items), pa.int64()), "title": [f"t{i}" for i in range(n_items)]})
    train = pa.table({"item_id": pa.array(np.arange(n_items), pa.int64())})
    valid = pa.table({"user_id": pa.array(rng.integers(0, 40, n), pa.int64()),
                      "item_id": pa.array(rng.integers(0, n_items, n), pa.int64()),
                      "ts": pa.array(np.arange(n), pa.int64()), "rating": pa.array(np.full(n, 5.0))})
    full, why = validation_pairs(items, train, valid, 4.0)
    assert why == "" and full.num_rows > 500
    every, counts = sampled_validation_pairs(full, None)
    assert every.equals(full) and counts == {"eval.pairs": full.num_rows, "eval.pairs_total": full.num_rows}
    assert sampled_validation_pairs(full, full.num_rows)[0].equals(full)
    some, counts = sampled_validation_pairs(full, 500)
    shuffled, _ = validation_pairs(items, train, valid.take(pa.array(rng.permutation(n))), 4.0)
    assert some.num_rows == 500 and some.to_pylist() == sampled_validation_pairs(shuffled, 500)[0].to_pylist()
    whole = set(map(tuple, full.to_pandas().to_numpy().tolist()))
    assert set(map(tuple, some.to_pandas().to_numpy().tolist())) <= whole
    assert counts == {"eval.pairs": 500.0, "eval.pairs_total": float(full.num_rows)}


def test_qarm_evaluate_scores_the_same_sample_of_pairs_for_every_model():
    """``qarm evaluate``'s embedding table: with ``max_pairs`` each period's pairs are the gate's
    kind of sample (``sample_pairs``), the same for every model, and the report says of how many."""
    from qarm_core.embed.evaluate import cooccurrence_pairs, sample_pairs
    from qarm_core.evaluation import embedding_table, render_report

    rng = np.random.default_rng(1)
    n_items, n = 200, 3000
    events = pa.table({"user_id": pa.array(rng.integers(0, 30, n), pa.int64()),
                       "item_id": pa.array(rng.integers(0, n_items, n), pa.int64()),
                       "ts": pa.array(np.arange(n), pa.int64()), "rating": pa.array(np.full(n, 5.0))})
    ids = np.arange(n_items)
    emb = {m: (ids, rng.standard_normal((n_items, 4)).astype(np.float32)) for m in ("a", "b")}
    full = cooccurrence_pairs(events, ids, 4.0)
    assert full.num_rows > 300
    rows = embedding_table(emb, ids, {"test": events}, 4.0, max_pairs=300)
    assert [(r["pairs"], r["pairs_total"]) for r in rows] == [(300, full.num_rows)] * 2
    every = embedding_table(emb, ids, {"test": events}, 4.0)
    assert [(r["pairs"], r["pairs_total"]) for r in every] == [(full.num_rows, full.num_rows)] * 2
    assert sample_pairs(full, None) == (full, full.num_rows) and sample_pairs(full, 10**9)[0] is full
    text = render_report({"embeddings": rows}, {"snapshot_id": "s"})
    assert f"300 of {full.num_rows:,} (sample)" in text


def test_the_embed_gate_keeps_the_published_model_unless_the_new_one_is_better():
    from qarm_core.embed.stage import choose_model

    assert choose_model({"finetuned": 0.2, "published": 0.1}, False, True)[:2] == ("finetuned", True)
    choice, passed, why = choose_model({"finetuned": 0.1, "published": 0.1, "base": 0.0}, False, True)
    assert (choice, passed) == ("published", False) and "kept the published model" in why
    # first run: the reference is the base model, and there is nothing to keep
    assert choose_model({"finetuned": 0.3, "base": 0.2}, False, False)[:2] == ("finetuned", True)
    choice, passed, why = choose_model({"finetuned": 0.1, "base": 0.2}, False, False)
    assert (choice, passed) == ("finetuned", False) and "no earlier model to keep" in why
    assert choose_model({}, True, True)[:2] == ("finetuned", True)                 # the reused model
    assert "not gated" in choose_model({}, False, True)[2]


def _periods(items):
    """(train, valid) events over the tiny catalog: users whose consecutive positives pair items of
    one genre in the validation period (items of genre g are ids g+1, g+5, ...)."""
    ids = np.sort(items["item_id"].to_numpy())
    train = pa.table({"user_id": np.arange(len(ids)), "item_id": ids, "ts": np.zeros(len(ids), np.int64),
                      "rating": np.full(len(ids), 5.0)})
    users, got = [], []
    for u, start in enumerate(ids[:12]):
        users += [100 + u] * 3
        got += [int(start), int(start) + 4, int(start) + 8]
    valid = pa.table({"user_id": users, "item_id": got, "ts": np.tile([1, 2, 3], 12).astype(np.int64),
                      "rating": np.full(len(got), 5.0)})
    return train, valid


def test_baselines_scored_beside_training_are_what_the_embed_stage_gates_on(tiny_lm_path, tiny_catalog, tmp_path):
    """``baselines_stage`` (which the flow runs beside training) scores each baseline's catalog
    embedding on the validation period's co-occurrence exactly as recall_report scores it by hand;
    the embed stage takes those scores for its gate (the base model is the reference of a first run)
    and embeds no baseline itself."""
    from qarm_core.embed.config import EmbedStageConfig
    from qarm_core.embed.embed import embed_catalog, embed_catalog_minilm
    from qarm_core.embed.evaluate import cooccurrence_pairs, recall_report
    from qarm_core.embed.stage import baselines_stage, embed_stage, read_baseline_scores
    from qarm_core.events import POSITIVE_MIN_RATING
    from qarm_core.quantize.io import read_embeddings

    items, _, _ = tiny_catalog
    train, valid = _periods(items)
    cfg = EmbedStageConfig(model=_cfg(tiny_lm_path), infer=EmbedConfig(batch_size=8, dtype="float32"))
    assert cfg.baselines == ["base", "minilm"]
    table, report = baselines_stage(items, cfg, tmp_path / "baselines", train, valid)
    assert sorted(zip(table["model"].to_pylist(), table["metric"].to_pylist())) == \
        sorted((m, k) for m in ("base", "minilm") for k in ("mrr", "recall_at_10", "recall_at_50"))
    # by hand: each baseline embedded on its own, scored on the consecutive positives of validation
    pairs = cooccurrence_pairs(valid, train["item_id"].to_numpy(), POSITIVE_MIN_RATING)
    by_hand = {}
    for name, rec in (("base", embed_catalog(items, tmp_path / "base", cfg.model, cfg.infer)),
                      ("minilm", embed_catalog_minilm(items, tmp_path / "minilm", cfg.infer))):
        got = recall_report(*read_embeddings(rec.path), pairs, (10, 50))
        by_hand |= {f"valid.{name}.{k}": v for k, v in got.items() if k != "queries"}
    assert read_baseline_scores(table) == by_hand == {k: v for k, v in report.items() if k.startswith("valid.")}
    # a real signal, not a constant: MiniLM finds same-genre neighbours better than chance (3 in 23)
    assert by_hand["valid.minilm.recall_at_10"] > 10 / 23
    _, given = embed_stage(items, tiny_lm_path, cfg, tmp_path / "given", train_events=train, valid_events=valid,
                           baselines=table)
    assert {k: v for k, v in given.items() if k.startswith(("valid.base.", "valid.minilm."))} == by_hand
    assert f"> base {by_hand['valid.base.recall_at_10']:.4f}" in given["notes"]["embed.gate"] or \
        f"<= base {by_hand['valid.base.recall_at_10']:.4f}" in given["notes"]["embed.gate"]
    assert sorted(p.name for p in (tmp_path / "given").iterdir()) == ["finetuned"]
    # without the baselines' scores a first run has no reference: scored, not gated
    _, alone = embed_stage(items, tiny_lm_path, cfg, tmp_path / "alone", train_events=train, valid_events=valid)
    assert not any(k.startswith(("valid.base.", "valid.minilm.")) for k in alone)
    assert "not gated" in alone["notes"]["embed.gate"]


def test_the_published_model_is_scored_again_only_when_asked(tiny_lm_path, tiny_catalog, tmp_path):
    """A day that reuses the published model has no choice to make: it is not scored (a search of
    the catalog per validation query) unless ``eval_reused_model``; then it scores as a new model does."""
    from qarm_core.embed.config import EmbedStageConfig
    from qarm_core.embed.stage import embed_stage

    items, _, _ = tiny_catalog
    train, valid = _periods(items)
    cfg = EmbedStageConfig(model=_cfg(tiny_lm_path), infer=EmbedConfig(batch_size=8, dtype="float32"), baselines=[])
    _, new = embed_stage(items, tiny_lm_path, cfg, tmp_path / "new", train_events=train, valid_events=valid)
    _, reused = embed_stage(items, tiny_lm_path, cfg, tmp_path / "reused", train_events=train, valid_events=valid,
                            model_is_published=True)
    assert "valid.finetuned.recall_at_10" in new and not any(k.startswith("valid.") for k in reused)
    assert "eval.pairs" not in reused and "eval_reused_model" in reused["notes"]["eval"]
    assert reused["gate.passed"] == 1.0 and reused["notes"]["model_choice"] == "finetuned"
    asked = cfg.model_copy(update={"eval_reused_model": True})
    _, scored = embed_stage(items, tiny_lm_path, asked, tmp_path / "asked", train_events=train, valid_events=valid,
                            model_is_published=True)
    assert {k: v for k, v in scored.items() if k.startswith("valid.")} == \
        {k: v for k, v in new.items() if k.startswith("valid.")}


def test_baselines_without_validation_events_score_nothing_and_say_why(tiny_lm_path, tiny_catalog, tmp_path):
    from qarm_core.embed.config import EmbedStageConfig
    from qarm_core.embed.stage import baselines_stage

    items, _, _ = tiny_catalog
    train, valid = _periods(items)
    cfg = EmbedStageConfig(model=_cfg(tiny_lm_path))
    table, report = baselines_stage(items, cfg, tmp_path / "b", train, None)
    assert table.num_rows == 0 and report["notes"]["eval"] == "skipped: no validation events given"
    table, report = baselines_stage(items, cfg, tmp_path / "b", train, valid.filter(pa.compute.less(valid["ts"], 2)))
    assert table.num_rows == 0 and "no co-occurring positives" in report["notes"]["eval"]
    assert not (tmp_path / "b").exists()            # nothing to score on: nothing embedded


def test_evaluate_embeddings_file(tiny_lm_path, tiny_catalog, tmp_path):
    from qarm_core.embed.embed import embed_catalog
    from qarm_core.embed.evaluate import evaluate_embeddings, retrieval_metrics
    from qarm_core.quantize.io import read_embeddings

    items, judgments, _ = tiny_catalog
    embed_catalog(items, tmp_path / "e", _cfg(tiny_lm_path), EmbedConfig(base_pooling="emb"))
    m = evaluate_embeddings(tmp_path / "e", judgments, k=10)
    ids, x = read_embeddings(tmp_path / "e")
    assert m.queries == 120 and m.catalog == 24
    assert (m.recall_at_k, m.mrr) == (retrieval_metrics(ids, x, judgments, 10).recall_at_k,
                                      retrieval_metrics(ids, x, judgments, 10).mrr)
    assert m.model_version.startswith("base:")
    with pytest.raises(DataError, match="stage=evaluate"):
        evaluate_embeddings(tmp_path / "nope", judgments)


# ---------------------------------------------------------------- bad input
def test_bad_inputs(tiny_lm_path, tiny_catalog, tmp_path):
    from qarm_core.embed.embed import embed_catalog
    from qarm_core.embed.train import train_embedding_model

    items, judgments, qa = tiny_catalog
    tcfg = TrainConfig(use_deepspeed=False, max_steps=1, batch_size=4)
    empty = judgments.slice(0, 0)
    with pytest.raises(DataError, match=r"\[stage=train, dataset=judgments\].*empty"):
        train_embedding_model(items, empty, qa, tmp_path / "r", _cfg(tiny_lm_path), tcfg)
    none_kept = judgments.set_column(2, "keep", pa.array([False] * judgments.num_rows))
    with pytest.raises(DataError, match=r"\[stage=train, dataset=judgments\].*none kept"):
        train_embedding_model(items, none_kept, qa, tmp_path / "r", _cfg(tiny_lm_path), tcfg)
    unknown = pa.table({"src_item": pa.array([1, 5000], pa.int64()), "dst_item": pa.array([2, 3], pa.int64()),
                        "keep": [True, True]})
    with pytest.raises(DataError, match=r"\[stage=train, dataset=judgments\].*not in the items table.*5000"):
        train_embedding_model(items, unknown, qa, tmp_path / "r", _cfg(tiny_lm_path), tcfg)
    with pytest.raises(DataError, match=r"\[stage=train, dataset=model\].*does not exist"):
        train_embedding_model(items, judgments, qa, tmp_path / "r", EmbedModelConfig(model=str(tmp_path / "nope")), tcfg)
    with pytest.raises(DataError, match=r"\[stage=embed, dataset=model\].*does not exist"):
        embed_catalog(items, tmp_path / "e", EmbedModelConfig(model=str(tmp_path / "nope")))
    (tmp_path / "notmodel").mkdir()
    with pytest.raises(DataError, match=r"\[stage=embed, dataset=model\].*no config.json"):
        embed_catalog(items, tmp_path / "e", EmbedModelConfig(model=str(tmp_path / "notmodel")))
    dup = pa.concat_tables([items, items.slice(0, 1)])
    with pytest.raises(DataError, match=r"\[stage=embed, dataset=items\].*not unique"):
        embed_catalog(dup, tmp_path / "e", _cfg(tiny_lm_path))
    with pytest.raises(DataError, match=r"\[stage=embed, dataset=items\].*empty"):
        embed_catalog(items.slice(0, 0), tmp_path / "e", _cfg(tiny_lm_path))


def test_configs_are_strict():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TrainConfig(batch_sise=4)                           # typo
    with pytest.raises(ValidationError):
        TrainConfig(batch_size="4")                         # no coercion
    with pytest.raises(ValidationError, match="nproc"):
        TrainConfig(launcher="torchrun", nproc=1)
    with pytest.raises(ValidationError, match="divisible"):
        TrainConfig(batch_size=5, nproc=2)
    with pytest.raises(ValidationError, match="grad_cache_chunk"):
        TrainConfig(batch_size=8, grad_cache_chunk=3)
    assert TrainConfig().zero_stage == 2 and EmbedModelConfig().dim == 128


def test_package_import_is_light():
    import subprocess
    import sys

    code = ("import sys, qarm_core.embed, qarm_core.embed.config, qarm_core.embed.evaluate, qarm_core.embed.train, "
            "qarm_core.embed.embed; bad = [m for m in ('torch', 'transformers', 'deepspeed', 'prefect', 'mlflow') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
