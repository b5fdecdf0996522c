"""qarm_core.lm.prefix_attention: attention over a shared prefix read in place equals attention over
the prefix's keys copied in front of every row's keys (the reference: softmax over the concatenation)."""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")

from qarm_core.lm import prefix_attention as pa_mod  # noqa: E402


def _reference(query, kp, vp, key, value, allowed, scale):
    """Softmax attention of ``query`` (B, H, q, d) over [prefix; own] keys, the prefix's copied per
    row and every key/value head repeated for its query heads; ``allowed`` (B, 1, q, k) over own keys."""
    b, h = query.shape[:2]
    g = h // kp.shape[1]
    k_all = torch.cat([kp.expand(b, -1, -1, -1), key], 2).repeat_interleave(g, 1)
    v_all = torch.cat([vp.expand(b, -1, -1, -1), value], 2).repeat_interleave(g, 1)
    ok = torch.cat([torch.ones(*allowed.shape[:3], kp.shape[2], dtype=torch.bool), allowed], 3)
    s = (query.double() @ k_all.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~ok, float("-inf"))
    return (torch.softmax(s, -1) @ v_all.double()).transpose(1, 2)


def _tensors(seed, b=3, h=6, kvh=2, q=4, k=7, p=5, d=8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    return r(b, h, q, d), r(1, kvh, p, d), r(1, kvh, p, d), r(b, kvh, k, d), r(b, kvh, k, d)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_shared_prefix_attention_equals_attention_over_copied_keys(dtype, tol):
    query, kp, vp, key, value = _tensors(0, dtype=dtype)
    b, q, k = query.shape[0], query.shape[2], key.shape[2]
    module = types.SimpleNamespace(layer_idx=1)
    # a padded batch: row 1 has its last 2 keys masked, row 2 its last 3; causal over the last q keys
    allowed = torch.ones(q, k, dtype=torch.bool).tril(k - q)[None, None].repeat(b, 1, 1, 1)
    allowed[1, ..., -2:] = False
    allowed[2, ..., -3:] = False
    want = _reference(query, kp, vp, key, value, allowed, 0.35)
    other = (torch.zeros_like(kp), torch.zeros_like(vp))      # layer 0's prefix must not be read
    with pa_mod.reading([other, (kp, vp)]):
        got, weights = pa_mod.shared_prefix_attention(module, query, key, value, allowed, scaling=0.35)
        # the same mask given additively, and no mask where the q queries are the last q keys
        got_add, _ = pa_mod.shared_prefix_attention(module, query, key, value, pa_mod._additive(allowed, dtype),
                                                    scaling=0.35)
        got_none, _ = pa_mod.shared_prefix_attention(module, query, key, value, None, scaling=0.35)
        got_step, _ = pa_mod.shared_prefix_attention(module, query[:, :, -1:], key, value, None, scaling=0.35)
    assert weights is None and got.shape == (b, q, query.shape[1], query.shape[3]) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(got_add, got)
    full = torch.ones(q, k, dtype=torch.bool).tril(k - q)[None, None].repeat(b, 1, 1, 1)
    torch.testing.assert_close(got_none.double(), _reference(query, kp, vp, key, value, full, 0.35), atol=tol, rtol=tol)
    # one decoding step (q = 1) sees every key
    step_want = _reference(query[:, :, -1:], kp, vp, key, value, torch.ones(b, 1, 1, k, dtype=torch.bool), 0.35)
    torch.testing.assert_close(got_step.double(), step_want, atol=tol, rtol=tol)


def test_without_a_prefix_it_is_transformers_sdpa():
    """Outside ``reading`` the function is SDPA's (the model stays usable for anything else)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, _, _, key, value = _tensors(1)
    module = types.SimpleNamespace(layer_idx=0, num_key_value_groups=3, is_causal=True)
    want, _ = sdpa_attention_forward(module, query, key[:, :, -4:], value[:, :, -4:], None, scaling=0.5)
    got, _ = pa_mod.shared_prefix_attention(module, query, key[:, :, -4:], value[:, :, -4:], None, scaling=0.5)
    torch.testing.assert_close(got, want)


def test_supports_only_sdpa_models_with_addressable_layers(tiny_lm):
    from qarm_core.lm.config import LocalModelConfig
    from qarm_core.lm.local import LocalLM

    lm = LocalLM(LocalModelConfig(model_path=str(tiny_lm.cfg.model_path), dtype="float32"))
    assert lm.shared_prefix and pa_mod.supports(lm.model)
    lm.model.set_attn_implementation("eager")       # another attention: the prefix is copied instead
    assert not pa_mod.supports(lm.model)


@pytest.mark.parametrize("with_prefix", [True, False])
def test_packed_rows_attend_as_each_row_alone(with_prefix):
    """Rows packed into one sequence (``Packed``): each row's queries see the prefix, its own
    context's valid keys and its own earlier tokens, as when the row runs alone; ``kept`` holds the
    layer's own keys/values as the padded batch."""
    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    h, kvh, d, lc = 6, 2, 8, 5
    lens, group, c_lens = [3, 1, 4], [1, 0, 1], [5, 2]
    rows, width, total = len(lens), max(lens), sum(lens)
    query, key, value = r(1, h, total, d), r(1, kvh, total, d), r(1, kvh, total, d)
    kp, vp = r(1, kvh, 4, d), r(1, kvh, 4, d)
    kc, vc = r(2, kvh, lc, d), r(2, kvh, lc, d)
    slots, allowed = [], torch.zeros(rows, 1, width, lc + width, dtype=torch.bool)
    for i, n in enumerate(lens):
        slots += [i * width + t for t in range(n)]
        allowed[i, 0, :, :c_lens[group[i]]] = True
        allowed[i, 0, :, lc:] = torch.ones(width, width, dtype=torch.bool).tril() & (torch.arange(width) < n)
    packed = pa_mod.Packed(torch.tensor(slots), rows, width, [(kc, vc)], torch.tensor(group), kept={})
    module = types.SimpleNamespace(layer_idx=0)
    with pa_mod.reading([(kp, vp)] if with_prefix else None, packed):
        got, _ = pa_mod.shared_prefix_attention(module, query, key, value, pa_mod._additive(allowed, torch.float32),
                                                scaling=0.3)
    assert got.shape == (1, total, h, d)
    empty = (kp[:, :, :0], vp[:, :, :0])
    at = 0
    for i, n in enumerate(lens):
        g, own = group[i], slice(at, at + n)
        keys = torch.cat([kc[g:g + 1, :, :c_lens[g]], key[:, :, own]], 2)
        values = torch.cat([vc[g:g + 1, :, :c_lens[g]], value[:, :, own]], 2)
        ok = torch.cat([torch.ones(n, c_lens[g], dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1)
        want = _reference(query[:, :, own], *((kp, vp) if with_prefix else empty), keys, values, ok[None, None], 0.3)
        torch.testing.assert_close(got[:, own].double(), want, atol=1e-5, rtol=1e-5)
        k_kept = packed.kept[0][0]
        torch.testing.assert_close(k_kept[i, :, :n], key[0, :, own])
        assert not k_kept[i, :, n:].any()           # padding slots hold zeros
        at += n
    # packing is the inverse of unpacking on the rows' tokens
    torch.testing.assert_close(packed.packed(packed.padded(query)), query)
