"""
Tests for zaya.py, train.py, sample.py and kernels.py. Run: python -m pytest -q test_zaya.py

What they prove, with small random models and data made here:
- the model computes exactly what transformers' ZayaForCausalLM (the reference, v5.24.0) computes, with every
  parameter randomised; checkpoints round-trip in the native and legacy layouts; the exact 8B builds on meta;
- the TiDAR layouts are the masks and predecessor chains of ../shared/docs/TIDAR.md, and the training layout
  computes the same function as the inference layout;
- greedy TiDAR decoding is token-for-token greedy AR decoding, and the lossless sampler at temperature 1 draws
  from the AR distribution (chi-square test, false-failure probability written there);
- bad input gets one clear line and a non-zero exit.
Tolerances: fp32 comparisons against the reference use 1e-4 on logits of size ~1-10 (float32 rounding of
different but equivalent op orders, ~1e-6 seen); float64 comparisons of the same math use 1e-10.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from zaya import (CheckpointError, KVCache, Zaya, ZayaConfig, causal_layout, tidar_step_layout)
from sample import generate_ar, generate_tidar

HERE = os.path.dirname(os.path.abspath(__file__))


def small_config(**kw):
    base = dict(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, num_experts=4, moe_intermediate_size=32, router_hidden_size=24,
                max_position_embeddings=512, rope_theta=1000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                mask_token_id=3, block_size=4)
    return ZayaConfig(**{**base, **kw})


def randomised(config, seed=0, std=0.2, dtype=torch.float32):
    """A model with EVERY parameter random: weights N(0, std); 1-D scales/norms/temps 1 + N(0, 0.3); biases,
    residual biases and balancing biases random too (the skip class stays at -1: the reference forces it)."""
    torch.manual_seed(seed)
    m = Zaya(config)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(0, 0.3 if p.dim() < 2 else std)
            if n.endswith(("scale", "temp")) or (n.endswith("weight") and p.dim() == 1):
                p.add_(1.0)
        for layer in m.layers:
            layer.mlp.gate.balancing_biases.copy_(torch.cat([torch.randn(config.num_experts) * 0.05, torch.tensor([-1.0])]))
    return m.to(dtype).eval()


def reference(path, dtype=torch.float32):
    transformers = pytest.importorskip("transformers") if not os.environ.get("CI") else __import__("transformers")
    return transformers.ZayaForCausalLM.from_pretrained(path, dtype=dtype).eval()

# -----------------------------------------------------------------------------
# the model against the reference


CONFIGS = {"gqa2": {}, "gqa3-odd-rope": dict(num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                                               partial_rotary_factor=0.75, num_hidden_layers=2, num_experts=3)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_reference(tmp_path, name):
    m = randomised(small_config(**CONFIGS[name]), std=0.5)
    m.save_pretrained(tmp_path)
    ref = reference(tmp_path)
    idx = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = m(idx)[0], ref(idx).logits
    assert ours.abs().max() > 1.0                                  # not a degenerate, all-zero model
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # the routing is exercised: several experts chosen in every layer, and the skip class somewhere
    assert all(int((l.mlp.load[:-1] > 0).sum()) >= 2 for l in m.layers)
    assert sum(int(l.mlp.load[-1]) for l in m.layers) > 0


def test_greedy_generation_matches_reference(tmp_path):
    m = randomised(small_config(), std=0.5)
    m.save_pretrained(tmp_path)
    ref = reference(tmp_path)
    idx = torch.randint(5, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    ours, stats = generate_ar(m, idx, 32)
    theirs = ref.generate(idx, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours.shape == (2, 42) and stats.forwards == 31 and stats.tokens_per_forward == 1.0
    assert len(set(ours[0, 10:].tolist())) > 3                    # a non-trivial continuation
    assert torch.equal(ours, theirs)


def test_cached_decode_equals_full_forward():
    m = randomised(small_config())
    idx = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(idx)[0]
        cache = KVCache(m.config, 2, 64)
        pos, pred, mask = causal_layout(12)
        parts = [m.forward_hidden(idx[:, :12], pos, pred, mask, cache)]
        cache.commit(torch.tensor([12, 12]))
        one = torch.ones(1, 1, dtype=torch.bool)
        for t in range(12, 30):
            parts.append(m.forward_hidden(idx[:, t:t + 1], cache.lengths[:, None], torch.ones(2, 1, dtype=torch.long), one, cache))
            cache.commit(torch.tensor([1, 1]))
    torch.testing.assert_close(m.lm_head(torch.cat(parts, 1)), full, atol=1e-4, rtol=0)
    assert cache.lengths.tolist() == [30, 30]


def test_cache_commit_truncates_rejected_tokens():
    """A forward over 5 tokens that commits only 2 leaves the cache exactly as a 2-token forward would."""
    m = randomised(small_config(), dtype=torch.float64)
    idx = torch.randint(0, 97, (1, 13), generator=torch.Generator().manual_seed(4))
    a, b = KVCache(m.config, 1, 32, torch.float64), KVCache(m.config, 1, 32, torch.float64)
    with torch.no_grad():
        for cache, extra in ((a, 5), (b, 2)):
            pos, pred, mask = causal_layout(8)
            m.forward_hidden(idx[:, :8], pos, pred, mask, cache)
            cache.commit(torch.tensor([8]))
            pos, pred, mask = causal_layout(extra)
            m.forward_hidden(idx[:, 8:8 + extra], pos + 8, pred, mask, cache)
            cache.commit(torch.tensor([2]))
    assert a.lengths.item() == b.lengths.item() == 10
    torch.testing.assert_close(a.k[..., :10, :], b.k[..., :10, :], atol=1e-12, rtol=0)
    torch.testing.assert_close(a.conv, b.conv, atol=1e-12, rtol=0)
    torch.testing.assert_close(a.vdel, b.vdel, atol=1e-12, rtol=0)

# -----------------------------------------------------------------------------
# checkpoints


def _to_legacy(m):
    """Our state dict written by hand in the legacy Megatron layout of ZAYA1.md section 3.2 (80 sub-layers)."""
    out, L = {}, len(m.layers)
    attn = {"qkv_proj.q_proj": "qkv.linear_q", "qkv_proj.k_proj": "qkv.linear_k", "qkv_proj.v_proj_current": "qkv.val_proj1",
            "qkv_proj.v_proj_delayed": "qkv.val_proj2", "qkv_proj.conv_qk_depthwise": "qkv.conv_qk.0",
            "qkv_proj.conv_qk_grouped": "qkv.conv_qk.1", "qk_norm.temp": "qkv.temp", "o_proj": "o_proj"}
    router = {"router_mlp.norm": "rmsnorm_eda", "router_mlp.fc1": "router_mlp.0", "router_mlp.fc2": "router_mlp.2",
              "router_mlp.out_proj": "router_mlp.4"}
    for k, v in m.state_dict().items():
        if k.startswith("input_hidden_states_"):
            out[f"model.layers.0.res_scale.{k[len('input_'):]}"] = v
        elif k == "embed_tokens.weight":
            out["model.embed_tokens.weight"] = v
        elif k.startswith("norm."):
            out["model.final_norm." + k[5:]] = v
        else:
            _, i, rest = k.split(".", 2)
            i = int(i)
            if rest.startswith("input_layernorm."):
                out[f"model.layers.{2 * i}.input_norm.{rest.split('.', 1)[1]}"] = v
            elif rest.startswith("post_attention_layernorm."):
                out[f"model.layers.{2 * i + 1}.input_norm.{rest.split('.', 1)[1]}"] = v
            elif rest.startswith("self_attn."):
                r = rest[len("self_attn."):]
                a = next(a for a in attn if (r + ".").startswith(a + "."))
                out[f"model.layers.{2 * i}.self_attn.{attn[a]}{r[len(a):]}"] = v
            elif rest.startswith("mlp.gate."):
                r = rest[len("mlp.gate."):]
                a = next((a for a in router if r.startswith(a + ".")), None)
                out[f"model.layers.{2 * i + 1}.zaya_block.router.{router[a] + r[len(a):] if a else r}"] = v
            elif rest.startswith("mlp.experts."):
                fc = "linear_fc1" if rest.endswith("gate_up_proj") else "linear_fc2"
                for e in range(v.shape[0]):
                    out[f"model.layers.{2 * i + 1}.zaya_block.experts.local_experts.{e}.{fc}.weight"] = v[e].clone()
            elif rest.startswith("post_attention_residual_scale."):
                out[f"model.layers.{2 * i + 1}.res_scale.{rest.split('.', 1)[1]}"] = v
            elif rest.startswith("post_mlp_residual_scale."):
                s = rest.split(".", 1)[1]
                out[f"model.res_scale.{s}" if i == L - 1 else f"model.layers.{2 * i + 2}.res_scale.{s}"] = v
    return out


def test_legacy_checkpoint_loads_to_same_logits(tmp_path):
    from safetensors.torch import save_file
    m = randomised(small_config())
    c = m.config
    sd = {k: v.contiguous() for k, v in _to_legacy(m).items()}
    assert not any(".mlp." in k for k in sd)                       # really the other layout
    half = len(sd) // 2
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:half]}, tmp_path / "a.safetensors")
    save_file({k: sd[k] for k in keys[half:]}, tmp_path / "b.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: ("a.safetensors" if i < half else "b.safetensors") for i, k in enumerate(keys)}}))
    (tmp_path / "config.json").write_text(json.dumps(dict(
        num_hidden_layers=2 * c.num_hidden_layers, ffn_hidden_size=2 * c.moe_intermediate_size,
        zaya_mlp_expansion=c.router_hidden_size, num_query_groups=c.num_key_value_heads, norm_epsilon=c.rms_norm_eps,
        hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads, kv_channels=c.head_dim,
        num_experts=c.num_experts, vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings,
        rotary_base=c.rope_theta, rotary_percent=c.partial_rotary_factor, moe_router_topk=1, zaya_use_eda=True,
        zaya_use_mod=True, cca=True, scale_residual_merge=True, residual_in_fp32=True)))
    loaded = Zaya.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], m(idx)[0], atol=1e-6, rtol=0)


def test_sharded_save_loads_in_reference_and_back(tmp_path):
    m = randomised(small_config())
    m.save_pretrained(tmp_path, max_shard_bytes=60_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob(".tmp-*"))                        # no temp files left behind
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        want = m(idx)[0]
        torch.testing.assert_close(reference(tmp_path)(idx).logits, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(Zaya.from_pretrained(str(tmp_path))(idx)[0], want, atol=1e-6, rtol=0)


def test_8b_on_meta_has_the_reference_parameter_count():
    transformers = __import__("transformers")
    c = ZayaConfig.from_name("zaya1-8b")
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size, c.mask_token_id, c.eos_token_id) == (2048, 40, 262272, 4, 106)
    with torch.device("meta"):
        m = Zaya(c)
        ref = transformers.ZayaForCausalLM(transformers.ZayaConfig())
        logits, _ = m(torch.zeros(1, 8, dtype=torch.long))
    n, active = m.num_params(), m.num_params(active=True)
    n_ref = sum(p.numel() for p in ref.parameters())
    print(f"\nZAYA1-8B: {n:,} parameters ({n - m.embed_tokens.weight.numel():,} without the tied embedding), "
          f"{active / 1e6:.1f}M active per token")
    assert logits.shape == (1, 8, 262272)
    assert n == n_ref == 8_840_488_784
    # ZAYA1.md's 8,840,479,224 counts the 17 balancing biases of each layer (a buffer) and leaves out each
    # layer's router RMSNorm weight (256): the same model, counted differently.
    n_buffers = sum(l.mlp.gate.balancing_biases.numel() for l in m.layers)
    assert n + n_buffers - 40 * 256 == 8_840_479_224
    assert 753.5e6 < active < 753.7e6


def test_checkpoint_mismatch_names_every_problem(tmp_path):
    from safetensors.torch import load_file, save_file
    m = randomised(small_config())
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.self_attn.o_proj.weight"]                              # missing
    sd["model.layers.0.mlp.gate.extra_thing"] = torch.zeros(3)                    # unexpected
    sd["model.layers.2.mlp.experts.down_proj"] = torch.zeros(4, 48, 31)           # wrong shape
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        Zaya.from_pretrained(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    for name in ("layers.1.self_attn.o_proj.weight", "layers.0.mlp.gate.extra_thing", "layers.2.mlp.experts.down_proj"):
        assert name in msg


def test_input_longer_than_context_raises():
    m = randomised(small_config(max_position_embeddings=64))
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        m(torch.zeros(1, 65, dtype=torch.long))
    m(torch.zeros(1, 64, dtype=torch.long))                                       # the limit itself is fine
    with pytest.raises(ValueError, match="64 tokens"):
        generate_ar(m, torch.zeros(1, 60, dtype=torch.long), 5)


def test_config_defaults_and_presets():
    c = ZayaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=8, num_experts=2, moe_intermediate_size=8, router_hidden_size=8)
    Zaya(c)(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown preset"):
        ZayaConfig.from_name("gpt5")
    with pytest.raises(ValueError, match="mask_token_id"):
        ZayaConfig(vocab_size=10, mask_token_id=10)

# -----------------------------------------------------------------------------
# TiDAR: training layout == inference layout


def test_training_blocks_equal_inference_mask_groups():
    """TIDAR.md section 2: block b's diffusion logits from forward_tidar equal (a) K masks placed after the cached
    clean prefix x_0..x_{bK-1} (the prefill layout) and (b) decode-step group g placed after d_0..d_g, when the
    group starts at bK. float64, same math in different layouts: 1e-10."""
    K = 4
    m = randomised(small_config(block_size=K), dtype=torch.float64)
    idx = torch.randint(5, 97, (2, 16), generator=torch.Generator().manual_seed(5))
    M = m.config.mask_token_id
    with torch.no_grad():
        _, diff = m.forward_tidar(idx, K)
        for b in range(4):
            cache = KVCache(m.config, 2, 64, torch.float64)
            if b:
                pos, pred, mask = causal_layout(b * K)
                m.forward_hidden(idx[:, :b * K], pos, pred, mask, cache)
                cache.commit(torch.tensor([b * K] * 2))
            j = torch.arange(K)
            h = m.forward_hidden(torch.full((2, K), M), b * K + j, torch.where(j == 0, 1, j + 1),
                                 torch.ones(K, K, dtype=torch.bool), cache)
            torch.testing.assert_close(m.lm_head(h), diff[:, b * K:(b + 1) * K], atol=1e-10, rtol=0)
        # (b) the decode step: committed prefix L, drafts d_j = x_{L+j}; group g (L+g+1 = 8) predicts block 2
        for g in (0, 2, 3):
            L = 8 - g - 1
            cache = KVCache(m.config, 2, 64, torch.float64)
            pos, pred, mask = causal_layout(L)
            m.forward_hidden(idx[:, :L], pos, pred, mask, cache)
            cache.commit(torch.tensor([L] * 2))
            offs, spred, smask = tidar_step_layout(K, None)
            q = torch.cat([idx[:, L:L + K], torch.full((2, K * K), M)], 1)
            h = m.forward_hidden(q, L + offs, spred, smask, cache)
            torch.testing.assert_close(m.lm_head(h[:, K + g * K:K + (g + 1) * K]), diff[:, 8:12], atol=1e-10, rtol=0)
            # and the draft slots d_j are the plain AR logits
            torch.testing.assert_close(m.lm_head(h[:, :K]), m(idx[:, :L + K])[0][:, L:], atol=1e-10, rtol=0)


def test_step_layout_brute_force():
    """The decode-step mask against the rules of TIDAR.md section 3, written out token by token."""
    K, groups = 4, [0, 2, 3]
    offs, pred, mask = tidar_step_layout(K, groups)
    N = K + K * len(groups)
    for q in range(N):
        for k in range(N):
            if q < K:
                want = k <= q
            else:
                gi, g = (q - K) // K, groups[(q - K) // K]
                want = (k < K and k <= g) or (k >= K and (k - K) // K == gi)
            assert bool(mask[q, k]) == want, (q, k)
        if q >= K:
            gi, s = (q - K) // K, (q - K) % K
            assert offs[q] == groups[gi] + 1 + s
            assert pred[q] == (groups[gi] + 2 if s == 0 else q + 1)

# -----------------------------------------------------------------------------
# samplers


def model_accepting(kind, dtype=torch.float64):
    """Models whose drafts are accepted always / partly / never (checked by the caller)."""
    if kind == "always":           # a large constant bias on the last residual: every position predicts one token
        m = randomised(small_config(), seed=0, std=1.0, dtype=dtype)
        with torch.no_grad():
            m.layers[-1].post_mlp_residual_scale.hidden_states_bias.add_(1e6 * torch.randn(m.config.hidden_size, dtype=dtype))
    elif kind == "partly":
        m = randomised(small_config(), seed=1, std=0.5, dtype=dtype)
    else:                          # the mask embedding drowns everything else: drafts ignore the context
        m = randomised(small_config(), seed=1, std=1.0, dtype=dtype)
        with torch.no_grad():
            m.embed_tokens.weight[m.config.mask_token_id] *= 1000
    return m


@pytest.mark.parametrize("kind", ["always", "partly", "never"])
def test_greedy_tidar_equals_greedy_ar(kind):
    m = model_accepting(kind)
    idx = torch.randint(5, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    want, _ = generate_ar(m, idx, 40)
    for K in (4, 8, 16):
        for sampler, w in (("lossless", 0.5), ("mix", 1.0)):
            got, st = generate_tidar(m, idx, 40, sampler=sampler, mix_weight=w, block_size=K)
            assert torch.equal(got, want), (kind, K, sampler)
            accepted = sum((n - 1) * c for n, c in st.histogram.items())
            if kind == "always":
                assert set(st.histogram) == {K}
            elif kind == "never":
                assert accepted == 0
            else:
                assert 0 < accepted and set(st.histogram) != {K}


def test_greedy_tidar_with_sparse_groups_is_lossless():
    m = model_accepting("partly")
    idx = torch.randint(5, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    want, _ = generate_ar(m, idx, 40)
    for groups in ([0], [0, 2], [0, 4, 7, 11]):
        got, st = generate_tidar(m, idx, 40, block_size=16 if 11 in groups else 4, groups=groups)
        assert torch.equal(got, want) and st.groups == tuple(groups)


def _wilson_hilferty(df, z=3.0902):
    """Chi-square upper quantile for false-failure probability 1e-3 (z = Phi^-1(0.999)); accurate to <1% for df > 10."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_lossless_sampling_matches_ar_distribution():
    """At temperature 1 the first 3 new tokens of the lossless sampler are distributed as AR sampling. The exact
    AR joint distribution is computed by enumerating all continuations on a 5-token vocabulary (the mask token is
    never emitted: 4 tokens, 64 cells). 12,000 rows are decoded in one batch (rows draw independently).
    Pearson chi-square against the 0.999 quantile: this test fails falsely with probability 1e-3."""
    cfg = small_config(vocab_size=5, mask_token_id=4, pad_token_id=0, bos_token_id=0, eos_token_id=0, block_size=4,
                       num_hidden_layers=2)
    m = randomised(cfg, seed=3, std=0.5)
    prompt = torch.tensor([1, 3, 2, 0])
    with torch.no_grad():
        seqs = torch.tensor([[a, b] for a in range(4) for b in range(4)])                      # [16, 2]
        x = torch.cat([prompt.expand(16, -1), seqs], 1)
        lp = m(x)[0][..., :4].double().log_softmax(-1)                                          # exclude the mask
    p1 = lp[0, 3].exp()
    p2 = lp[::4, 4].exp()                                                                       # [a] -> p(b | a)
    p3 = lp[:, 5].exp().view(4, 4, 4)                                                           # [a, b] -> p(c | a, b)
    exact = (p1[:, None, None] * p2[:, :, None] * p3).flatten()
    n = 12_000
    got, st = generate_tidar(m, prompt.expand(n, -1), 3, temperature=1.0, block_size=4,
                             generator=torch.Generator().manual_seed(0))
    assert sum((k - 1) * c for k, c in st.histogram.items()) > 1000                         # drafts accepted...
    assert st.histogram.get(1, 0) > 1000                                                     # ...and rejected
    new = got[:, 4:]
    counts = torch.bincount(new[:, 0] * 16 + new[:, 1] * 4 + new[:, 2], minlength=64).double()
    expected = exact * n
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    assert chi2 < _wilson_hilferty(df), (chi2, df)


def test_batches_and_ragged_prompts_equal_per_row_decoding():
    m = model_accepting("partly")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(5, 97, (n,), generator=g) for n in (3, 9, 14)]
    for gen in (generate_ar, generate_tidar):
        together, _ = gen(m, prompts, 25)
        assert isinstance(together, list)
        for p, row in zip(prompts, together):
            alone, _ = gen(m, p[None], 25)
            assert torch.equal(row, alone[0])
    batch = torch.stack([p[:3] for p in prompts])
    together, _ = generate_tidar(m, batch, 25)
    for b in range(3):
        assert torch.equal(together[b], generate_tidar(m, batch[b:b + 1], 25)[0][0])


def test_cache_after_tidar_holds_exactly_the_committed_tokens():
    """After decoding, each row's cache equals a fresh prefill of exactly its committed tokens: K/V of every
    slot below the row's length, and the CCA state. The committed tokens are the greedy AR sequence."""
    m = model_accepting("partly")
    prompts = [torch.randint(5, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 11)]
    _, st = generate_tidar(m, prompts, 17, block_size=4)
    cache = st.cache
    full, _ = generate_ar(m, prompts, 17 + 8)
    for b, seq in enumerate(full):
        L = int(cache.lengths[b])
        assert len(prompts[b]) + 16 <= L + 1 <= len(seq)
        fresh = KVCache(m.config, 1, 64, torch.float64)
        pos, pred, mask = causal_layout(L)
        with torch.no_grad():
            m.forward_hidden(seq[None, :L], pos, pred, mask, fresh)
        fresh.commit(torch.tensor([L]))
        torch.testing.assert_close(cache.k[:, b, :, :L], fresh.k[:, 0, :, :L], atol=1e-10, rtol=0)
        torch.testing.assert_close(cache.v[:, b, :, :L], fresh.v[:, 0, :, :L], atol=1e-10, rtol=0)
        torch.testing.assert_close(cache.conv[:, b], fresh.conv[:, 0], atol=1e-10, rtol=0)
        torch.testing.assert_close(cache.vdel[:, b], fresh.vdel[:, 0], atol=1e-10, rtol=0)


def test_mask_token_never_emitted_and_bad_arguments():
    m = model_accepting("never")                    # the mask token's own logit is huge at mask positions
    idx = torch.randint(5, 97, (2, 6), generator=torch.Generator().manual_seed(8))
    for t in (0.0, 1.0):
        out, _ = generate_tidar(m, idx, 30, temperature=t, generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 36) and not (out[:, 6:] == m.config.mask_token_id).any()
    for kw, msg in ((dict(mix_weight=1.5, sampler="mix"), "mix_weight"), (dict(block_size=0), "block_size"),
                    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(sampler="best"), "sampler")):
        with pytest.raises(ValueError, match=msg):
            generate_tidar(m, idx, 5, **kw)
    with pytest.raises(ValueError, match="context"):
        generate_tidar(m, torch.zeros(1, 510, dtype=torch.long), 5)

# -----------------------------------------------------------------------------
# proposal levels chosen per machine (groups="auto")


def test_level_chooser_on_synthetic_latency_curves():
    from sample import choose_levels, level_rate
    K = 16
    c = [0.0] + [0.8] * (K - 1) + [0.0]                         # c[s]: slot s accepted given all before were
    flat = {n: 1.0 for n in range(1, K * (K + 1) + 1)}          # memory-bound: every query size costs the same
    linear = {n: float(n) for n in flat}                        # compute-bound: cost grows with the query
    levels, rate = choose_levels(c, flat, K)
    assert levels == list(range(K)) and rate == pytest.approx(level_rate(levels, c, flat, K))
    levels, rate = choose_levels(c, linear, K)
    assert len(levels) <= 2 and levels[0] == 0
    assert rate > level_rate(list(range(K)), c, linear, K) * 2
    # the model itself: with every draft accepted, the dense set commits K tokens per step
    assert level_rate(list(range(K)), [1.0] * (K + 1), flat, K) == pytest.approx(K)
    # and with no draft ever accepted, one token per step whatever the set
    assert level_rate([0, 5], [0.0] * (K + 1), flat, K) == pytest.approx(1.0)
    # a machine where AR steps are so cheap that no level set can win: auto decodes AR, still lossless
    assert max(choose_levels(c, {**linear, 1: 1e-6}, K)[1], 0) < 1 / 1e-6


def test_auto_levels_are_lossless_and_rows_independent():
    m = model_accepting("partly")
    prompts = [torch.randint(5, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 12)]
    want, _ = generate_ar(m, prompts, 40)
    got, st = generate_tidar(m, prompts, 40, groups="auto", block_size=8)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and st.note
    alone, _ = generate_tidar(m, prompts[1][None], 40, groups="auto", block_size=8)
    assert torch.equal(alone[0], want[1])

# -----------------------------------------------------------------------------
# reliability: broken checkpoints, numerics


def test_broken_checkpoints_give_one_clear_error(tmp_path):
    m = randomised(small_config())
    good = tmp_path / "good"
    m.save_pretrained(good)
    cases = {}
    cases["missing path"] = tmp_path / "nope"
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((good / "config.json").read_text())
    cases["config but no weights"] = tmp_path / "noweights"
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    cases["corrupt config"] = tmp_path / "badjson"
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text((good / "config.json").read_text())
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(os.urandom(2000))
    cases["corrupt safetensors"] = tmp_path / "corrupt"
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "config.json").write_text((good / "config.json").read_text())
    data = (good / "model.safetensors").read_bytes()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(data[:len(data) // 2])
    cases["truncated safetensors"] = tmp_path / "trunc"
    from dataclasses import asdict
    torch.save({"config": asdict(m.config), "model": m.state_dict()}, tmp_path / "own.pt")
    (tmp_path / "own_trunc.pt").write_bytes((tmp_path / "own.pt").read_bytes()[:5000])
    cases["truncated own checkpoint"] = tmp_path / "own_trunc.pt"
    (tmp_path / "own_garbage.pt").write_bytes(b"\x00" * 100)
    cases["garbage own checkpoint"] = tmp_path / "own_garbage.pt"
    assert Zaya.from_pretrained(str(tmp_path / "own.pt")).config == m.config        # the intact one loads
    for what, path in cases.items():
        with pytest.raises(CheckpointError) as e:
            Zaya.from_pretrained(str(path))
        assert "\n" not in str(e.value) and str(path) in str(e.value), what


def test_sample_cli_bad_input_is_one_line(tmp_path, capsys):
    m = randomised(small_config(vocab_size=320, mask_token_id=257, eos_token_id=256, bos_token_id=256,
                                pad_token_id=258, max_position_embeddings=64))
    from dataclasses import asdict
    torch.save({"config": asdict(m.config), "model": m.state_dict(), "tokenizer": "bytes"}, tmp_path / "ckpt.pt")
    ok = subprocess.run([sys.executable, "sample.py", f"--init_from={tmp_path}", "--max_new_tokens=8", "--json"],
                        cwd=HERE, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.strip().splitlines()[-1])["new_tokens"] == 8
    bad = {"--init_from=/nonexistent/ckpt": "nonexistent", "--mix_weight=1.5 --sampler=mix": "mix_weight",
           "--block_size=-1": "block_size", "--temperature=-1": "temperature", "--top_k=-3": "top_k",
           "--sampler=fast": "sampler", "--max_new_tokens=60": "context", "--colour=red": "unknown",
           "--max_new_tokens=ten": "int", "--groups=0,99": "groups"}
    from sample import cli
    for args, word in bad.items():
        extra = [] if "init_from" in args else [f"--init_from={tmp_path}"]
        if args in ("--init_from=/nonexistent/ckpt", "--colour=red"):       # through the real entry point
            r = subprocess.run([sys.executable, "sample.py", *extra, *args.split()], cwd=HERE, capture_output=True,
                               text=True, timeout=120)
            code, err = r.returncode, r.stderr
        else:
            capsys.readouterr()
            code, err = cli(extra + args.split()), capsys.readouterr().err
        assert code != 0 and "Traceback" not in err, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and word in lines[0], (args, err)


def test_verify_logits_fp32_and_bf16_divergence_rate():
    """Greedy TiDAR must equal greedy AR in float32 and float64. In bf16 the multi-token step and the one-token
    AR step round differently, so near-ties can flip; the verify logits are fp32 (for exactly that reason) and
    the measured rate of diverging rows is printed (README: 'lossless under bf16')."""
    from sample import _logits
    prompts = torch.randint(5, 97, (48, 12), generator=torch.Generator().manual_seed(0))
    rates = {}
    for dt in (torch.float32, torch.bfloat16):
        m = randomised(small_config(), seed=1, std=0.5, dtype=dt)
        assert _logits(m, torch.zeros(1, m.config.hidden_size, dtype=dt)).dtype == torch.float32
        a, _ = generate_ar(m, prompts, 24)
        b, _ = generate_tidar(m, prompts, 24, block_size=8)
        rates[dt] = float((a != b).any(1).float().mean())
    print(f"\nrows whose greedy TiDAR and AR continuations differ: fp32 {rates[torch.float32]:.0%}, "
          f"bf16 {rates[torch.bfloat16]:.0%} (48 prompts x 24 tokens, random model)")
    assert rates[torch.float32] == 0.0
    assert rates[torch.bfloat16] < 0.9
