"""
Tests for every program file. Run: python -m pytest -q test_zaya.py (about 11 minutes on 2 cores);
python -m pytest -q -m "not slow" test_zaya.py runs the fast subset (about a minute): every test but
those marked slow (pipelines, compiled paths, several processes, statistical tests; see pytest.ini).

What they prove, with small random models and data made here:
- the model computes exactly what transformers' ZayaForCausalLM (the reference, v5.24.0) computes,
  with every parameter randomised; checkpoints round-trip in the native and legacy layouts; the
  exact 8B builds on meta;
- the TiDAR layouts are the masks and predecessor chains of docs/tidar.md, and the training layout
  computes the same function as the inference layout;
- greedy TiDAR decoding is token-for-token greedy AR decoding, and the lossless sampler at
  temperature 1 draws from the AR distribution (chi-square test, false-failure probability written
  there);
- bad input gets one clear line and a non-zero exit.

Tolerances: fp32 comparisons against the reference use 1e-4 on logits of size ~1-10 (float32
rounding of different but equivalent op orders, ~1e-6 seen); float64 comparisons of the same math
use 1e-10.
"""

import ast
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
import sample
import train
from zaya import (
    CheckpointError,
    KVCache,
    Zaya,
    ZayaConfig,
    causal_layout,
    tidar_step_layout,
    tidar_train_layout,
)
from sample import generate_ar, generate_tidar

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP spin-waiting makes 2 threads up to 50x
    slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def byte_model(**kw):
    """A random small model with the byte tokenizer's ids (eot 256, mask 257, pad 258; 320 ids)."""
    ids = dict(vocab_size=320, mask_token_id=257, eos_token_id=256, bos_token_id=256)
    return randomised(small_config(**{**ids, "pad_token_id": 258, **kw}))


def small_config(**kw):
    base = dict(
        vocab_size=97,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        moe_intermediate_size=32,
        router_hidden_size=24,
        max_position_embeddings=512,
        rope_theta=1000.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        mask_token_id=3,
        block_size=4,
    )
    return ZayaConfig(**{**base, **kw})


def randomised(config, seed=0, std=0.2, dtype=torch.float32, device="cpu"):
    """A model with EVERY parameter random: weights N(0, std); 1-D scales/norms/temps 1 + N(0, 0.3);
    biases, residual biases and balancing biases random too (the skip class stays at -1: the
    reference forces it).
    """
    torch.manual_seed(seed)
    m = Zaya(config)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(0, 0.3 if p.dim() < 2 else std)
            if n.endswith(("scale", "temp")) or (n.endswith("weight") and p.dim() == 1):
                p.add_(1.0)
        for layer in m.layers:
            layer.mlp.gate.balancing_biases.copy_(
                torch.cat([torch.randn(config.num_experts) * 0.05, torch.tensor([-1.0])])
            )
    return m.to(device=device, dtype=dtype).eval()


def reference(path, dtype=torch.float32):
    transformers = (
        pytest.importorskip("transformers")
        if not os.environ.get("CI")
        else __import__("transformers")
    )
    return transformers.ZayaForCausalLM.from_pretrained(path, dtype=dtype).eval()


# -----------------------------------------------------------------------------
# the model against the reference


CONFIGS = {
    "gqa2": {},
    "gqa3-odd-rope": dict(
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=8,
        partial_rotary_factor=0.75,
        num_hidden_layers=2,
        num_experts=3,
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_reference(tmp_path, name):
    m = randomised(small_config(**CONFIGS[name]), std=0.5)
    m.save_pretrained(tmp_path)
    ref = reference(tmp_path)
    idx = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = m(idx)[0], ref(idx).logits
    assert ours.abs().max() > 1.0  # not a degenerate, all-zero model
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # the routing is exercised: several experts chosen in every layer, and the skip class somewhere
    assert all(int((l.mlp.load[:-1] > 0).sum()) >= 2 for l in m.layers)
    assert sum(int(l.mlp.load[-1]) for l in m.layers) > 0


@pytest.mark.parametrize("name", ["zaya-small", "zaya-small-tidar"])
def test_bundled_models_load_through_the_hf_path_and_match_the_reference(name):
    """The two bundled models (models/, each an HF directory in bf16 with its tokenizer.json and
    training log): ours and transformers' ZayaForCausalLM load the same directory, both in float32,
    and give the same logits on Python text the bundled tokenizer encodes (atol 1e-4 on logits of
    size ~10, as for the random models above); the pair share one tokenizer and one shape, and fit
    the 40 MB budget."""
    from cli import get_tokenizer

    d = Path(__file__).resolve().parent / "models" / name
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_log.json"} <= set(
        os.listdir(d)
    )
    ours = Zaya.from_pretrained(str(d), dtype=torch.float32).eval()
    enc, ids = get_tokenizer(str(d))
    assert (
        ours.config.vocab_size == ids["vocab_size"]
        and ours.config.mask_token_id == ids["mask"] == 4
    )
    assert ours.config.pad_token_id == ids["pad"] == 0 and ours.config.eos_token_id == ids["eot"]
    text = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"
    idx = torch.tensor([enc.encode(text)])
    with torch.no_grad():
        mine, theirs = ours(idx)[0], reference(str(d))(idx).logits
    assert mine.abs().max() > 1.0
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    sizes = sum(f.stat().st_size for f in d.parent.glob("zaya-small*/*"))
    assert (
        sizes <= 40e6
        and (d.parent / "zaya-small" / "tokenizer.json").read_bytes()
        == (d.parent / "zaya-small-tidar" / "tokenizer.json").read_bytes()
    )


def test_greedy_generation_matches_reference(tmp_path):
    m = randomised(small_config(), std=0.5)
    m.save_pretrained(tmp_path)
    ref = reference(tmp_path)
    idx = torch.randint(5, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    ours, stats = generate_ar(m, idx, 32)
    theirs = ref.generate(idx, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours.shape == (2, 42) and stats.forwards == 31 and stats.tokens_per_forward == 1.0
    assert len(set(ours[0, 10:].tolist())) > 3  # a non-trivial continuation
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
            parts.append(
                m.forward_hidden(
                    idx[:, t : t + 1],
                    cache.lengths[:, None],
                    torch.ones(2, 1, dtype=torch.long),
                    one,
                    cache,
                )
            )
            cache.commit(torch.tensor([1, 1]))
    torch.testing.assert_close(m.lm_head(torch.cat(parts, 1)), full, atol=1e-4, rtol=0)
    assert cache.lengths.tolist() == [30, 30]


def test_cache_commit_truncates_rejected_tokens():
    """A forward over 5 tokens that commits only 2 leaves the cache exactly as a 2-token forward
    would."""
    m = randomised(small_config(), dtype=torch.float64)
    idx = torch.randint(0, 97, (1, 13), generator=torch.Generator().manual_seed(4))
    a, b = KVCache(m.config, 1, 32, torch.float64), KVCache(m.config, 1, 32, torch.float64)
    with torch.no_grad():
        for cache, extra in ((a, 5), (b, 2)):
            pos, pred, mask = causal_layout(8)
            m.forward_hidden(idx[:, :8], pos, pred, mask, cache)
            cache.commit(torch.tensor([8]))
            pos, pred, mask = causal_layout(extra)
            m.forward_hidden(idx[:, 8 : 8 + extra], pos + 8, pred, mask, cache)
            cache.commit(torch.tensor([2]))
    assert a.lengths.item() == b.lengths.item() == 10
    torch.testing.assert_close(a.k[..., :10, :], b.k[..., :10, :], atol=1e-12, rtol=0)
    torch.testing.assert_close(a.conv, b.conv, atol=1e-12, rtol=0)
    torch.testing.assert_close(a.vdel, b.vdel, atol=1e-12, rtol=0)


# -----------------------------------------------------------------------------
# checkpoints


def _to_legacy(m):
    """Our state dict written by hand in the legacy Megatron layout of docs/zaya1.md section 3.2 (80
    sub-layers)."""
    out, L = {}, len(m.layers)
    attn = {
        "qkv_proj.q_proj": "qkv.linear_q",
        "qkv_proj.k_proj": "qkv.linear_k",
        "qkv_proj.v_proj_current": "qkv.val_proj1",
        "qkv_proj.v_proj_delayed": "qkv.val_proj2",
        "qkv_proj.conv_qk_depthwise": "qkv.conv_qk.0",
        "qkv_proj.conv_qk_grouped": "qkv.conv_qk.1",
        "qk_norm.temp": "qkv.temp",
        "o_proj": "o_proj",
    }
    router = {
        "router_mlp.norm": "rmsnorm_eda",
        "router_mlp.fc1": "router_mlp.0",
        "router_mlp.fc2": "router_mlp.2",
        "router_mlp.out_proj": "router_mlp.4",
    }
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
                r = rest[len("self_attn.") :]
                a = next(a for a in attn if (r + ".").startswith(a + "."))
                out[f"model.layers.{2 * i}.self_attn.{attn[a]}{r[len(a):]}"] = v
            elif rest.startswith("mlp.gate."):
                r = rest[len("mlp.gate.") :]
                a = next((a for a in router if r.startswith(a + ".")), None)
                name = router[a] + r[len(a) :] if a else r
                out[f"model.layers.{2 * i + 1}.zaya_block.router.{name}"] = v
            elif rest.startswith("mlp.experts."):
                fc = "linear_fc1" if rest.endswith("gate_up_proj") else "linear_fc2"
                for e in range(v.shape[0]):
                    out[
                        f"model.layers.{2 * i + 1}.zaya_block.experts.local_experts.{e}.{fc}.weight"
                    ] = v[e].clone()
            elif rest.startswith("post_attention_residual_scale."):
                out[f"model.layers.{2 * i + 1}.res_scale.{rest.split('.', 1)[1]}"] = v
            elif rest.startswith("post_mlp_residual_scale."):
                s = rest.split(".", 1)[1]
                out[
                    (
                        f"model.res_scale.{s}"
                        if i == L - 1
                        else f"model.layers.{2 * i + 2}.res_scale.{s}"
                    )
                ] = v
    return out


def test_legacy_checkpoint_loads_to_same_logits(tmp_path):
    from safetensors.torch import save_file

    m = randomised(small_config())
    c = m.config
    sd = {k: v.contiguous() for k, v in _to_legacy(m).items()}
    assert not any(".mlp." in k for k in sd)  # really the other layout
    half = len(sd) // 2
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:half]}, tmp_path / "a.safetensors")
    save_file({k: sd[k] for k in keys[half:]}, tmp_path / "b.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    k: ("a.safetensors" if i < half else "b.safetensors")
                    for i, k in enumerate(keys)
                }
            }
        )
    )
    (tmp_path / "config.json").write_text(
        json.dumps(
            dict(
                num_hidden_layers=2 * c.num_hidden_layers,
                ffn_hidden_size=2 * c.moe_intermediate_size,
                zaya_mlp_expansion=c.router_hidden_size,
                num_query_groups=c.num_key_value_heads,
                norm_epsilon=c.rms_norm_eps,
                hidden_size=c.hidden_size,
                num_attention_heads=c.num_attention_heads,
                kv_channels=c.head_dim,
                num_experts=c.num_experts,
                vocab_size=c.vocab_size,
                max_position_embeddings=c.max_position_embeddings,
                rotary_base=c.rope_theta,
                rotary_percent=c.partial_rotary_factor,
                moe_router_topk=1,
                zaya_use_eda=True,
                zaya_use_mod=True,
                cca=True,
                scale_residual_merge=True,
                residual_in_fp32=True,
            )
        )
    )
    loaded = Zaya.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], m(idx)[0], atol=1e-6, rtol=0)
    # rows lo:hi of a stacked expert tensor are read expert by expert; a rank may own none of them
    parts = train.load_checkpoint(str(tmp_path))[1]
    want = m.layers[1].mlp.experts.gate_up_proj.detach()
    assert torch.equal(parts["layers.1.mlp.experts.gate_up_proj"][1](slice(1, 3)), want[1:3])
    assert parts["layers.1.mlp.experts.gate_up_proj"][1](slice(4, 4)).shape == (0, *want.shape[1:])


def test_sharded_save_loads_in_reference_and_back(tmp_path):
    m = randomised(small_config())
    m.save_pretrained(tmp_path, max_shard_bytes=60_000)
    assert (
        len(list(tmp_path.glob("model-*.safetensors"))) > 1
        and (tmp_path / "model.safetensors.index.json").exists()
    )
    assert not list(tmp_path.glob("tmp-*"))  # no temp files left behind
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        want = m(idx)[0]
        torch.testing.assert_close(reference(tmp_path)(idx).logits, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            Zaya.from_pretrained(str(tmp_path))(idx)[0], want, atol=1e-6, rtol=0
        )


def test_8b_on_meta_has_the_reference_parameter_count():
    transformers = __import__("transformers")
    c = ZayaConfig.from_name("zaya1-8b")
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size, c.mask_token_id, c.eos_token_id) == (
        2048,
        40,
        262272,
        4,
        106,
    )
    with torch.device("meta"):
        m = Zaya(c)
        ref = transformers.ZayaForCausalLM(transformers.ZayaConfig())
        logits, _ = m(torch.zeros(1, 8, dtype=torch.long))
    n, active = m.num_params(), m.num_params(active=True)
    n_ref = sum(p.numel() for p in ref.parameters())
    print(
        f"\nZAYA1-8B: {n:,} parameters ({n - m.embed_tokens.weight.numel():,} without the tied "
        "embedding), "
        f"{active / 1e6:.1f}M active per token"
    )
    assert logits.shape == (1, 8, 262272)
    assert n == n_ref == 8_840_488_784
    # An older published figure, 8,840,479,224 (docs/results.md), counts the 17 balancing biases of
    # each layer (a buffer) and leaves out each layer's router RMSNorm weight (256): the same model.
    n_buffers = sum(l.mlp.gate.balancing_biases.numel() for l in m.layers)
    assert n + n_buffers - 40 * 256 == 8_840_479_224
    assert 753.5e6 < active < 753.7e6


def test_checkpoint_mismatch_names_every_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    m = randomised(small_config())
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.self_attn.o_proj.weight"]  # missing
    sd["model.layers.0.mlp.gate.extra_thing"] = torch.zeros(3)  # unexpected
    sd["model.layers.2.mlp.experts.down_proj"] = torch.zeros(4, 48, 31)  # wrong shape
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        Zaya.from_pretrained(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    for name in (
        "layers.1.self_attn.o_proj.weight",
        "layers.0.mlp.gate.extra_thing",
        "layers.2.mlp.experts.down_proj",
    ):
        assert name in msg


def test_input_longer_than_context_raises():
    m = randomised(small_config(max_position_embeddings=64))
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        m(torch.zeros(1, 65, dtype=torch.long))
    m(torch.zeros(1, 64, dtype=torch.long))  # the limit itself is fine
    with pytest.raises(ValueError, match="64 tokens"):
        generate_ar(m, torch.zeros(1, 60, dtype=torch.long), 5)


def test_config_defaults_and_presets():
    c = ZayaConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=2,
        moe_intermediate_size=8,
        router_hidden_size=8,
    )
    Zaya(c)(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown preset"):
        ZayaConfig.from_name("gpt5")
    with pytest.raises(ValueError, match="mask_token_id"):
        ZayaConfig(vocab_size=10, mask_token_id=10)


# -----------------------------------------------------------------------------
# TiDAR: training layout == inference layout


def test_training_blocks_equal_inference_mask_groups():
    """docs/tidar.md section 2: block b's diffusion logits from forward_tidar equal (a) K masks
    placed after the cached clean prefix x_0..x_{bK-1} (the prefill layout) and (b) decode-step
    group g placed after d_0..d_g, when the group starts at bK. float64, same math in different
    layouts: 1e-10."""
    K = 4
    m = randomised(small_config(block_size=K), dtype=torch.float64)
    idx = torch.randint(5, 97, (2, 16), generator=torch.Generator().manual_seed(5))
    M = m.config.mask_token_id
    with torch.no_grad():
        _, diff = forward_tidar(m, idx, K)
        for b in range(4):
            cache = KVCache(m.config, 2, 64, torch.float64)
            if b:
                pos, pred, mask = causal_layout(b * K)
                m.forward_hidden(idx[:, : b * K], pos, pred, mask, cache)
                cache.commit(torch.tensor([b * K] * 2))
            j = torch.arange(K)
            h = m.forward_hidden(
                torch.full((2, K), M),
                b * K + j,
                torch.where(j == 0, 1, j + 1),
                torch.ones(K, K, dtype=torch.bool),
                cache,
            )
            torch.testing.assert_close(
                m.lm_head(h), diff[:, b * K : (b + 1) * K], atol=1e-10, rtol=0
            )
        # (b) the decode step: committed prefix L, drafts d_j = x_{L+j}; group g (L+g+1 = 8)
        # predicts block 2
        for g in (0, 2, 3):
            L = 8 - g - 1
            cache = KVCache(m.config, 2, 64, torch.float64)
            pos, pred, mask = causal_layout(L)
            m.forward_hidden(idx[:, :L], pos, pred, mask, cache)
            cache.commit(torch.tensor([L] * 2))
            offs, spred, smask = tidar_step_layout(K, None)
            q = torch.cat([idx[:, L : L + K], torch.full((2, K * K), M)], 1)
            h = m.forward_hidden(q, L + offs, spred, smask, cache)
            torch.testing.assert_close(
                m.lm_head(h[:, K + g * K : K + (g + 1) * K]), diff[:, 8:12], atol=1e-10, rtol=0
            )
            # and the draft slots d_j are the plain AR logits
            torch.testing.assert_close(
                m.lm_head(h[:, :K]), m(idx[:, : L + K])[0][:, L:], atol=1e-10, rtol=0
            )


def test_step_layout_brute_force():
    """The decode-step mask against the rules of docs/tidar.md section 3, written out token by
    token."""
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
    if (
        kind == "always"
    ):  # a large constant bias on the last residual: every position predicts one token
        m = randomised(small_config(), seed=0, std=1.0, dtype=dtype)
        with torch.no_grad():
            m.layers[-1].post_mlp_residual_scale.hidden_states_bias.add_(
                1e6 * torch.randn(m.config.hidden_size, dtype=dtype)
            )
    elif kind == "partly":
        m = randomised(small_config(), seed=1, std=0.5, dtype=dtype)
    else:  # the mask embedding drowns everything else: drafts ignore the context
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
    """Chi-square upper quantile for false-failure probability 1e-3 (z = Phi^-1(0.999)); accurate to
    <1% for df > 10."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("draft_scale", [sample.DRAFT_SCALE, 1.0, 0.3])
@pytest.mark.slow
def test_lossless_sampling_matches_ar_distribution(draft_scale):
    """At temperature 1 the first 3 new tokens of the lossless sampler are distributed as AR
    sampling, whatever temperature the drafts are drawn at (1 / draft_scale: the default's, the
    model's own, a flat one). The exact AR joint distribution is computed by enumerating all
    continuations on a 5-token vocabulary (the mask token is never emitted: 4 tokens, 64 cells).
    12,000 rows are decoded in one batch (rows draw independently). Pearson chi-square against the
    0.999 quantile: each case fails falsely with probability 1e-3."""
    cfg = small_config(
        vocab_size=5,
        mask_token_id=4,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        block_size=4,
        num_hidden_layers=2,
    )
    m = randomised(cfg, seed=3, std=0.5)
    prompt = torch.tensor([1, 3, 2, 0])
    with torch.no_grad():
        seqs = torch.tensor([[a, b] for a in range(4) for b in range(4)])  # [16, 2]
        x = torch.cat([prompt.expand(16, -1), seqs], 1)
        lp = m(x)[0][..., :4].double().log_softmax(-1)  # exclude the mask
    p1 = lp[0, 3].exp()
    p2 = lp[::4, 4].exp()  # [a] -> p(b | a)
    p3 = lp[:, 5].exp().view(4, 4, 4)  # [a, b] -> p(c | a, b)
    exact = (p1[:, None, None] * p2[:, :, None] * p3).flatten()
    n = 12_000
    got, st = generate_tidar(
        m,
        prompt.expand(n, -1),
        3,
        temperature=1.0,
        block_size=4,
        generator=torch.Generator().manual_seed(0),
        draft_scale=draft_scale,
    )
    assert sum((k - 1) * c for k, c in st.histogram.items()) > 1000  # drafts accepted...
    assert st.histogram.get(1, 0) > 1000  # ...and rejected
    chi2, df = _chi_square(got[:, 4:], exact)
    assert chi2 < _wilson_hilferty(df), (chi2, df)


def _chi_square(new, exact):
    """Pearson chi-square of 3-token draws new [n, 3] over a 4-token vocabulary against the exact
    joint law exact [64]; cells expected below 5 are pooled into one. Returns (chi2, degrees of
    freedom).
    """
    counts = torch.bincount(new[:, 0] * 16 + new[:, 1] * 4 + new[:, 2], minlength=64).double()
    expected = exact * len(new)
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1


def test_prompt_lookup_drafts_copy_the_latest_longest_match():
    """lookup_drafts on hand-worked rows, then against a direct Python search on 64 random rows: the
    longest n <= 3 whose last n tokens occur earlier, its latest occurrence, the tokens after it."""
    from sample import lookup_drafts

    ctx = torch.tensor(
        [
            [1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3, 0, 0],  # "1 2 3" last seen at 4
            [4, 5, 6, 4, 8, 6, 4, 0, 0, 0, 0, 0, 0, 0],  # "6 4" at 2 (n=3 fails)
            [1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ]
    )  # no repeat at all
    lengths = torch.tensor([12, 7, 5])
    drafts, valid = lookup_drafts(ctx, lengths, 3, 4)
    assert drafts[0].tolist() == [7, 5, 1, 2] and valid[0].all()
    assert drafts[1, :3].tolist() == [8, 6, 4] and valid[1].tolist() == [True, True, True, False]
    assert not valid[2].any()

    def direct(row, n_max, D):  # the rule, one Python search per row
        for n in range(n_max, 0, -1):
            ends = [i for i in range(len(row) - n) if row[i : i + n] == row[len(row) - n :]]
            if ends and len(row) > n:
                return row[ends[-1] + n : ends[-1] + n + D]
        return []

    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 3, (64, 30), generator=g)  # 3 symbols: many repeats
    lengths = torch.randint(1, 31, (64,), generator=g)
    drafts, valid = lookup_drafts(ctx, lengths, 3, 5)
    for b in range(64):
        want = direct(ctx[b, : lengths[b]].tolist(), 3, 5)
        assert drafts[b, : int(valid[b].sum())].tolist() == want and valid[b].sum() == len(want), b


def test_prompt_lookup_is_lossless():
    """Prompt-lookup decoding verifies with the lossless rule: greedy output equals greedy AR in
    float64 (ragged prompts, with drafts accepted and rejected), and at temperature 1 the first 3
    new tokens follow the exact AR distribution (chi-square, false-failure probability 1e-3, as in
    test_lossless_sampling_matches_ar_distribution)."""
    from sample import generate_lookup

    m = model_accepting("partly")
    prompts = [torch.tensor([5, 6, 7, 8] * 3), torch.tensor([9, 10, 11, 9, 10])]
    want, _ = generate_ar(m, prompts, 48)
    got, st = generate_lookup(m, prompts, 48, num_draft=6)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert max(st.histogram) > 1 and 1 in st.histogram  # accepted and rejected

    cfg = small_config(
        vocab_size=5,
        mask_token_id=4,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        num_hidden_layers=2,
    )
    m = randomised(cfg, seed=3, std=0.5)
    prompt = torch.tensor([1, 3, 2, 0, 1, 3])
    with torch.no_grad():
        seqs = torch.tensor([[a, b] for a in range(4) for b in range(4)])  # [16, 2]
        lp = m(torch.cat([prompt.expand(16, -1), seqs], 1))[0][..., :4].double().log_softmax(-1)
    p1 = lp[0, 5].exp()
    p2 = lp[::4, 6].exp()
    p3 = lp[:, 7].exp().view(4, 4, 4)
    exact = (p1[:, None, None] * p2[:, :, None] * p3).flatten()
    n = 12_000
    got, st = generate_lookup(
        m,
        prompt.expand(n, -1),
        3,
        temperature=1.0,
        num_draft=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert sum((k - 1) * c for k, c in st.histogram.items()) > 1000 and st.histogram[1] > 1000
    chi2, df = _chi_square(got[:, 6:], exact)
    assert chi2 < _wilson_hilferty(df), (chi2, df)


def test_evaluation_counts_copies_and_scores_text_with_the_ar_head(tmp_path, capsys):
    """decode_report's two new measures. Copies: in its recorded lossless runs, a step is a copy
    exactly when its 2+ committed tokens occur in order in the context before it (checked against a
    direct search over the rebuilt context), summed over prompts with the runs' steps and tokens.
    Log-likelihood: a row's mean over prompts of the AR head's mean log p(x_t | x_<t) over the new
    tokens, each term from its own forward over the prefix (float64), here of the T=1 row's sampled
    text, drafted at the draft_scale asked for."""
    from sample import decode_report

    m = model_accepting("always")  # one token forever: long accepted copies
    K, prompts = m.config.block_size, [
        torch.tensor([5, 6, 7, 8, 5, 6, 7, 8, 5, 6]),
        torch.tensor([9, 5, 6]),
    ]
    res = decode_report(m, prompts, tmp_path, K, seeds=(), new_tokens=40)
    copies = made = steps = total = 0
    for prompt in prompts:  # the report's lossless runs, again
        _, st = generate_tidar(m, prompt[None], 40, block_size=K, record=True)
        ctx, steps = prompt.tolist() + [st.log[0][1]], steps + st.forwards
        for acc, own in st.log[1:]:
            step = acc + [own]
            text = " " + " ".join(map(str, ctx)) + " "
            copy = len(step) > 1 and (" " + " ".join(map(str, step)) + " ") in text
            copies, made, total, ctx = (
                copies + copy,
                made + copy * len(step),
                total + len(step),
                ctx + step,
            )
    assert res["copies"] == dict(steps=copies, of=steps, tokens=made) and 0 < copies < steps
    assert (
        f"the other steps {(total - made) / (steps - copies):.2f} tokens/forward"
        in capsys.readouterr().out
    )
    m = model_accepting("partly")
    prompts = [
        torch.randint(5, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (6, 9)
    ]
    rows = decode_report(m, prompts, tmp_path, K, seeds=(0,), new_tokens=12, draft_scale=0.5)[
        "rows"
    ]
    means = []
    for p in prompts:  # the report's T=1 seed 0 run, again
        toks = generate_tidar(
            m,
            p[None],
            12,
            block_size=K,
            temperature=1.0,
            draft_scale=0.5,
            generator=torch.Generator().manual_seed(0),
        )[0][0]
        terms = []
        for t in range(len(p), len(toks)):
            h = m.forward_hidden(toks[None, :t], *causal_layout(t))
            terms.append((h[0, -1] @ m.embed_tokens.weight.T).log_softmax(-1)[toks[t]])
        means.append(float(torch.stack(terms).mean()))
    row = next(r for r in rows if r["name"] == "lossless T=1 seed 0")
    assert abs(row["log_likelihood"] - sum(means) / len(means)) < 1e-9


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
        assert torch.equal(together[b], generate_tidar(m, batch[b : b + 1], 25)[0][0])


def final_cache(monkeypatch, generate, *args, **kw):
    """(generate(*args, **kw), the KVCache its decoding made, as the run left it)."""
    import sample

    made = []

    def make(*a, **k):
        made.append(KVCache(*a, **k))
        return made[-1]

    with monkeypatch.context() as mp:
        mp.setattr(sample, "KVCache", make)
        return generate(*args, **kw), made[-1]


def test_cache_after_tidar_holds_exactly_the_committed_tokens(monkeypatch):
    """After decoding, each row's cache equals a fresh prefill of exactly its committed tokens: K/V
    of every slot below the row's length, and the CCA state. The committed tokens are the greedy AR
    sequence.
    """
    m = model_accepting("partly")
    prompts = [
        torch.randint(5, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 11)
    ]
    _, cache = final_cache(monkeypatch, generate_tidar, m, prompts, 17, block_size=4)
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
    m = model_accepting("never")  # the mask token's own logit is huge at mask positions
    idx = torch.randint(5, 97, (2, 6), generator=torch.Generator().manual_seed(8))
    for t in (0.0, 1.0):
        out, _ = generate_tidar(
            m, idx, 30, temperature=t, generator=torch.Generator().manual_seed(0)
        )
        assert out.shape == (2, 36) and not (out[:, 6:] == m.config.mask_token_id).any()
    for kw, msg in (
        (dict(mix_weight=1.5, sampler="mix"), "mix_weight"),
        (dict(block_size=0), "block_size"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(sampler="best"), "sampler"),
        (dict(draft_scale=0.0), "draft_scale"),
    ):
        with pytest.raises(ValueError, match=msg):
            generate_tidar(m, idx, 5, **kw)
    with pytest.raises(ValueError, match="context"):
        generate_tidar(m, torch.zeros(1, 510, dtype=torch.long), 5)


# -----------------------------------------------------------------------------
# proposal levels chosen per machine (groups="auto")


def test_level_chooser_on_synthetic_latency_curves():
    from levels import choose_levels, level_rate

    K = 16
    c = [0.0] + [0.8] * (K - 1) + [0.0]  # c[s]: slot s accepted given all before were
    flat = {
        n: 1.0 for n in range(1, K * (K + 1) + 1)
    }  # memory-bound: every query size costs the same
    linear = {n: float(n) for n in flat}  # compute-bound: cost grows with the query
    levels, rate = choose_levels(c, flat.get, K)
    assert levels == list(range(K)) and rate == pytest.approx(level_rate(levels, c, K))
    levels, rate = choose_levels(c, linear.get, K)
    assert len(levels) <= 2 and levels[0] == 0
    assert rate > level_rate(list(range(K)), c, K) / linear[K * (K + 1)] * 2
    # the model itself: with every draft accepted, the dense set commits K tokens per step
    assert level_rate(list(range(K)), [1.0] * (K + 1), K) == pytest.approx(K)
    # and with no draft ever accepted, one token per step whatever the set
    assert level_rate([0, 5], [0.0] * (K + 1), K) == pytest.approx(1.0)
    # {0} alone alternates: a fully accepted block leaves no drafts for the next step
    # (K, 1, K, 1, ...)
    for k in (4, K, 32):  # (a periodic chain: the lazy chain must converge)
        assert level_rate([0], [1.0] * (k + 1), k) == pytest.approx((k + 1) / 2)


def simulated_machine(model, cost):
    """A fake clock that a forward over n query tokens advances by cost(n): a machine with a known
    latency curve, without timing anything. Returns (clock, sizes): sizes lists n for every forward
    after the prefill.
    """
    clock, sizes, forward = [0.0], [], model.forward_hidden

    def timed_forward(idx, *args, **kw):
        clock[0] += cost(idx.shape[1])
        sizes.append(idx.shape[1])
        return forward(idx, *args, **kw)

    model.forward_hidden = timed_forward
    return (lambda: clock[0]), sizes


def test_auto_falls_back_to_ar_where_no_level_set_can_win():
    """A machine where one AR step is 1000x cheaper than any TiDAR step: auto says so, decodes plain
    AR steps (one token per forward) without ever probing, and the output is still the greedy AR
    output."""
    from levels import AutoLevels

    m = model_accepting("always")  # even drafts that are always accepted cannot win
    fake = {n: 1.0 if n > 1 else 1e-3 for n in range(1, 21)}
    idx = torch.randint(5, 97, (1, 8), generator=torch.Generator().manual_seed(3))
    got, st = generate_tidar(m, idx, 20, groups=AutoLevels(latency=fake), block_size=4)
    assert "AR is faster" in st.note and set(st.histogram) == {1} and st.forwards == 19
    assert torch.equal(got, generate_ar(m, idx, 20)[0])


@pytest.mark.parametrize("kind", ["always", "never"])
def test_auto_schedule_on_a_compute_bound_machine(kind):
    """t(n) = 1 + n/8 (K = 4: AR 1.125, {0} 2, dense 3.5). Drafts always accepted: TiDAR wins and
    auto never leaves it. Never accepted: each 4-step probe loses 4 x (2 - 1.125) = 3.5 to AR, so
    with a 10% probe budget the next probe comes after 3.5 / (0.1 x 1.125) = 31.1 -> 32 AR steps,
    and the second's after twice that, 62.2 -> 63, exactly as documented; auto's simulated time
    exceeds plain AR's by at most the first probe's loss + 10% of its own time."""
    from levels import AutoLevels

    K, cost = 4, (lambda n: 1 + n / 8)
    m = model_accepting(kind)
    idx = torch.randint(5, 97, (1, 8), generator=torch.Generator().manual_seed(3))
    want, _ = generate_ar(m, idx, 80)
    clock, sizes = simulated_machine(m, cost)
    auto = AutoLevels(latency={n: cost(n) for n in range(1, 21)}, clock=clock, explore=0.1)
    got, st = generate_tidar(m, idx, 80, groups=auto, block_size=4)
    assert torch.equal(got, want)
    steps, t_auto, t_ar = sizes[1:], sum(cost(n) for n in sizes[1:]), 79 * cost(1)
    if kind == "always":
        assert min(steps) > 1 and st.tokens_per_forward > 2.5 and t_auto < 0.8 * t_ar
    else:
        probe = [2 * K] * 4
        assert steps == probe + [1] * 32 + probe + [1] * 39
        assert t_auto - t_ar <= 4 * (cost(2 * K) - cost(1)) + 0.1 * t_auto
        assert (
            auto.lost == pytest.approx(2 * 4 * (cost(2 * K) - cost(1))) and "probes lost" in st.note
        )
        assert st.groups == ()


def test_auto_probes_ever_more_rarely_while_ar_wins():
    """The n-th losing probe in a row waits n times as long as the first (on the machine above,
    drafts never accepted: 32, 63, 94 AR steps), so probing's share of the time falls. The same
    AutoLevels then decodes a model whose drafts are always accepted: its first probe loses
    nothing, though the old counts still predict AR, and ends the row (without that, the next
    probe would wait 94 steps); the probes that follow raise the counts until TiDAR wins."""
    from levels import AutoLevels

    K, cost = 4, (lambda n: 1 + n / 8)
    idx = torch.randint(5, 97, (1, 8), generator=torch.Generator().manual_seed(3))
    never = model_accepting("never")
    clock, sizes = simulated_machine(never, cost)
    auto = AutoLevels(latency={n: cost(n) for n in range(1, 21)}, clock=clock, explore=0.1)
    generate_tidar(never, idx, 200, groups=auto, block_size=K)
    probe = [2 * K] * 4
    assert sizes[1:] == probe + [1] * 32 + probe + [1] * 63 + probe + [1] * 92
    loss = 4 * (cost(2 * K) - cost(1))  # one probe's
    assert auto.losing == pytest.approx(3 * loss)
    assert auto.left == pytest.approx(3 * loss / (0.1 * cost(1)) - 92)  # 1.3 AR steps to go
    always = model_accepting("always")
    auto.clock, sizes = simulated_machine(always, cost)  # this model's forwards advance its clock
    got, st = generate_tidar(always, idx, 80, groups=auto, block_size=K)
    assert max(sizes[1:]) > 1 and auto.losing == 0.0  # TiDAR won: the streak is over
    assert torch.equal(got, generate_ar(always, idx, 80)[0])


def test_auto_spends_at_most_explore_of_the_time_choosing(monkeypatch):
    """Choosing takes time too (about 30 ms a choice on a flat curve on this CPU; docs/tidar.md
    section 7.6). While TiDAR wins, auto re-chooses so rarely that its choices cost at most
    `explore` of the TiDAR steps' time (+ the first choice): here each choice costs 4 time units
    on the simulated machine (t(n) = 1 + n/8, drafts always accepted, explore 0.1). Re-choosing
    every 8 steps would spend about 4 / (8 x 1.5) = 33% of the time choosing. The output is still
    the greedy AR output."""
    import levels

    K, cost = 4, (lambda n: 1 + n / 8)
    m = model_accepting("always")
    idx = torch.randint(5, 97, (1, 8), generator=torch.Generator().manual_seed(3))
    clock, sizes = simulated_machine(m, cost)
    spent = [0.0]  # the simulated time choices took
    real = levels.choose_levels

    def slow_choice(*args):
        spent[0] += 4.0
        return real(*args)

    monkeypatch.setattr(levels, "choose_levels", slow_choice)
    auto = levels.AutoLevels(
        latency={n: cost(n) for n in range(1, 21)}, clock=lambda: clock() + spent[0], explore=0.1
    )
    got, st = generate_tidar(m, idx, 200, groups=auto, block_size=K)
    steps = sum(cost(n) for n in sizes[1:])
    assert min(sizes[1:]) > 1 and st.tokens_per_forward > 2.5  # TiDAR won throughout
    assert spent[0] <= 0.1 * steps + 2 * 4.0, (spent[0], steps)  # + the start's and first choice
    assert torch.equal(got, generate_ar(m, idx, 200)[0])


def test_auto_resumes_its_schedule_in_the_next_reply():
    """Probing spends at most `explore` of the time over every reply, not per reply: on the
    machine above with drafts never accepted, the first 80-token reply ends 39 steps into a
    63-step AR stretch; the next reply with the same AutoLevels takes the 24 AR steps left before
    it probes again (a fresh one would probe first), then waits 3 probes' loss: 93.3 -> 94 steps.
    groups="auto" keeps one per model and sampling setting, and a fresh one once the weights
    change."""
    from levels import AutoLevels

    K, cost = 4, (lambda n: 1 + n / 8)
    m = model_accepting("never")
    idx = torch.randint(5, 97, (1, 8), generator=torch.Generator().manual_seed(3))
    clock, sizes = simulated_machine(m, cost)
    auto = AutoLevels(latency={n: cost(n) for n in range(1, 21)}, clock=clock, explore=0.1)
    generate_tidar(m, idx, 80, groups=auto, block_size=K)
    del sizes[:]
    got, _ = generate_tidar(m, idx, 80, groups=auto, block_size=K)
    probe = [2 * K] * 4
    assert sizes[1:] == [1] * 24 + probe + [1] * 51
    assert torch.equal(got, generate_ar(m, idx, 80)[0])
    setting = (K, 0.0, None, "lossless", 0.5, 1.5)
    one = AutoLevels.shared(m, setting)
    assert one is AutoLevels.shared(m, setting) and one is not AutoLevels.shared(
        m, (K, 1.0, *setting[2:])
    )
    with torch.no_grad():
        m.embed_tokens.weight.add_(0.0)  # an optimizer step: new weights
    assert AutoLevels.shared(m, setting) is not one


def test_auto_trusts_measured_step_times_over_the_calibration():
    """The calibration claims a flat curve, the machine is compute-bound (t(n) = 1 + n/8). With
    drafts partly accepted TiDAR would win on the flat curve but loses on the real one: the measured
    step times make auto pick AR. Ignoring them (latency only) makes this test fail."""
    from levels import AutoLevels

    K, cost = 4, (lambda n: 1 + n / 8)
    m = model_accepting("partly")
    idx = torch.randint(5, 97, (1, 8), generator=torch.Generator().manual_seed(3))
    for groups in ([0], None):  # the regime: drafts pay on a flat curve, not on this one
        tpf = generate_tidar(m, idx, 80, groups=groups, block_size=K)[1].tokens_per_forward
        assert 1.1 < tpf < cost(K + K * len(groups or range(K))) / cost(1), (
            groups,
            tpf,
        )  # 1.1: above the margin
    clock, sizes = simulated_machine(m, cost)
    auto = AutoLevels(latency={n: 1.0 for n in range(1, 21)}, clock=clock)
    got, st = generate_tidar(m, idx, 80, groups=auto, block_size=K)
    assert min(sizes[1:5]) > 1 and set(sizes[5:]) == {1}, sizes  # probe, then AR for good
    assert torch.equal(got, generate_ar(m, idx, 80)[0])


def test_auto_calibrates_on_a_cache_as_large_as_the_decode_cache(monkeypatch):
    """Compiled attention reads the whole static cache, so auto's latency curve is measured on
    caches of the capacity decoding made (a calibration on a prefix-sized cache underestimated
    compiled steps): every calibration cache is at least that large."""
    import levels

    m = model_accepting("partly")
    made, real = [], levels.KVCache
    spy = lambda c, B, n, **kw: made.append(n) or real(c, B, n, **kw)  # noqa: E731
    monkeypatch.setattr(levels, "KVCache", spy)
    monkeypatch.setattr(levels, "_CURVES", {})
    idx = torch.randint(5, 97, (1, 8), generator=torch.Generator().manual_seed(3))
    _, cache = final_cache(monkeypatch, generate_tidar, m, idx, 40, groups="auto", block_size=8)
    assert made and min(made) >= cache.capacity > 8 + 40


def test_acceptance_from_a_dense_histogram_predicts_its_tokens_per_forward():
    """A dense run starts every block at slot 1, so its histogram gives the per-slot acceptance
    exactly, and level_rate on that acceptance must give back the run's own tokens per forward."""
    from levels import acceptance_from_histogram, level_rate

    m = model_accepting("partly")
    for K in (4, 8):
        st = generate_tidar(
            m,
            torch.randint(5, 97, (3, 8), generator=torch.Generator().manual_seed(K)),
            60,
            block_size=K,
        )[1]
        c = acceptance_from_histogram(st.histogram, K)
        assert len(set(st.histogram)) > 2 and 0 < c[1] < 1  # a mixed regime
        steps = sum(st.histogram.values())
        want = sum(n * v for n, v in st.histogram.items()) / steps
        assert level_rate(list(range(K)), c, K) == pytest.approx(want, rel=1e-9)


def test_speed_report_measures_every_setting_side_by_side(capsys, monkeypatch):
    """The speed table's bookkeeping: auto's calibration runs first, untimed; then at T=0 and T=1
    every prompt runs every setting once a round, in an order rotating per prompt and round (no
    setting always first); one row per setting and temperature, AR at exactly 1.00x, a repeated AR
    row (this run's noise), bytes/s from the decoded text, and the tokens per forward each setting
    committed."""
    import sample
    from sample import LEVEL_RUNS, SPEED_RUNS, speed_report

    m = model_accepting("partly", dtype=torch.float32)
    prompts = [
        torch.randint(5, 97, (8,), generator=torch.Generator().manual_seed(s)) for s in (1, 2)
    ]
    calls, real = [], sample.report_decode

    def spy(*a, **kw):  # records each run's kind, levels, temperature
        calls.append((kw.get("kind", "tidar"), kw.get("groups"), kw["temperature"]))
        return real(*a, **kw)

    monkeypatch.setattr(sample, "report_decode", spy)
    runs = {
        **SPEED_RUNS,
        "AR again": LEVEL_RUNS["AR again"],
        "TiDAR dense": LEVEL_RUNS["TiDAR dense"],
    }
    rows = speed_report(m, prompts, 4, 12, lambda ids: "x" * 3 * len(ids), runs, rounds=2)
    assert len(calls) == 2 * 2 * 2 * len(runs) and [c[2] for c in calls] == [0.0] * 20 + [1.0] * 20
    assert len({calls[i * 5] for i in range(4)}) > 1  # the first setting rotates
    assert [r["name"] for r in rows] == [f"{n} T={t}" for t in (0, 1) for n in runs]
    by = {r["name"]: r for r in rows}
    assert (
        by["AR T=0"]["speedup"] == by["AR T=1"]["speedup"] == 1.0
        and by["AR again T=0"]["speedup"] > 0
    )
    assert all(
        r["bytes_per_s"] == pytest.approx(3 * r["tokens_per_s"]) for r in rows
    )  # 3 bytes a token here
    assert (
        by["AR T=0"]["tokens_per_forward"] == 1.0
        and by["TiDAR dense T=0"]["tokens_per_forward"] > 1
    )
    assert "speed on this machine: 2 held-out prompts x 2 rounds" in capsys.readouterr().out


def test_auto_levels_are_lossless_and_rows_independent():
    m = model_accepting("partly")
    prompts = [
        torch.randint(5, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 12)
    ]
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
    (tmp_path / "trunc" / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated safetensors"] = tmp_path / "trunc"
    from dataclasses import asdict

    torch.save({"config": asdict(m.config), "model": m.state_dict()}, tmp_path / "own.pt")
    (tmp_path / "own_trunc.pt").write_bytes((tmp_path / "own.pt").read_bytes()[:5000])
    cases["truncated own checkpoint"] = tmp_path / "own_trunc.pt"
    (tmp_path / "own_garbage.pt").write_bytes(b"\x00" * 100)
    cases["garbage own checkpoint"] = tmp_path / "own_garbage.pt"
    assert Zaya.from_pretrained(str(tmp_path / "own.pt")).config == m.config  # the intact one loads
    for what, path in cases.items():
        with pytest.raises(CheckpointError) as e:
            Zaya.from_pretrained(str(path))
        assert "\n" not in str(e.value) and str(path) in str(e.value), what


@pytest.mark.slow
def test_sample_cli_bad_input_is_one_line(tmp_path, capsys):
    m = byte_model(max_position_embeddings=64)
    from dataclasses import asdict

    torch.save(
        {"config": asdict(m.config), "model": m.state_dict(), "tokenizer": "bytes"},
        tmp_path / "ckpt.pt",
    )
    ok = subprocess.run(
        [sys.executable, "sample.py", f"--init_from={tmp_path}", "--max_new_tokens=8", "--json"],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.strip().splitlines()[-1])["new_tokens"] == 8
    bad = {
        "--init_from=/nonexistent/ckpt": "nonexistent",
        "--mix_weight=1.5 --sampler=mix": "mix_weight",
        "--block_size=-1": "block_size",
        "--temperature=-1": "temperature",
        "--top_k=-3": "top_k",
        "--sampler=fast": "sampler",
        "--max_new_tokens=60": "context",
        "--colour=red": "unknown",
        "--max_new_tokens=ten": "int",
        "--groups=0,99": "groups",
        "--draft_scale=-1": "draft_scale",
    }
    from sample import cli_main as cli

    for args, word in bad.items():
        extra = [] if "init_from" in args else [f"--init_from={tmp_path}"]
        if args in (
            "--init_from=/nonexistent/ckpt",
            "--colour=red",
        ):  # through the real entry point
            r = subprocess.run(
                [sys.executable, "sample.py", *extra, *args.split()],
                cwd=HERE,
                capture_output=True,
                text=True,
                timeout=120,
            )
            code, err = r.returncode, r.stderr
        else:
            capsys.readouterr()
            code, err = cli(extra + args.split()), capsys.readouterr().err
        assert code != 0 and "Traceback" not in err, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and word in lines[0], (args, err)


@pytest.mark.slow
def test_sample_compile_auto_times_a_step_and_compiled_gives_the_eager_text(
    tmp_path, capsys, monkeypatch
):
    """--compile=auto compiles on a CPU only when new_tokens eager AR steps (one timed) cost more
    than COMPILE_SECONDS plus the same steps at a third of the time; --compile=True decodes compiled
    and prints the eager text; a bad value is one line."""
    import sample

    m = byte_model(max_position_embeddings=64)
    assert not sample.compile_pays(m, 128, 16) and sample.compile_pays(m, 10**12, 16)
    step = sample.calibrate(m, 1, m.config.block_size, 16)[1]
    monkeypatch.setattr(sample, "COMPILE_SECONDS", 1000 * step)  # pays from 1,500 steps on
    assert not sample.compile_pays(m, 1400, 16) and sample.compile_pays(m, 1600, 16)
    from dataclasses import asdict

    torch.save(
        {"config": asdict(m.config), "model": m.state_dict(), "tokenizer": "bytes"},
        tmp_path / "ckpt.pt",
    )
    args = [f"--init_from={tmp_path}", "--sampler=ar", "--max_new_tokens=8", "--json"]
    texts = {}
    for c in ("False", "True"):
        capsys.readouterr()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        sample.main(args + [f"--compile={c}"])
        texts[c], report = capsys.readouterr().out.split("\n---\n")
        assert (
            json.loads(report.splitlines()[-1])["compiled"]
            == (c == "True")
            == ("(compiled)" in report)
        )
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs) == (c == "True")
    assert texts["True"] == texts["False"] and len(texts["False"]) > len("def main(")
    capsys.readouterr()
    assert sample.cli_main(args + ["--compile=maybe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile=maybe" in err[0]


@pytest.mark.slow
def test_verify_logits_fp32_and_bf16_divergence_rate():
    """Greedy TiDAR must equal greedy AR in float32 and float64. In bf16 the multi-token step and
    the one-token AR step round differently, so near-ties can flip; the verify logits are fp32 (for
    exactly that reason) and the measured rate of diverging rows is printed (README: 'lossless under
    bf16')."""
    from sample import head_logits as _logits

    prompts = torch.randint(5, 97, (48, 12), generator=torch.Generator().manual_seed(0))
    rates = {}
    for dt in (torch.float32, torch.bfloat16):
        m = randomised(small_config(), seed=1, std=0.5, dtype=dt)
        assert _logits(m, torch.zeros(1, m.config.hidden_size, dtype=dt)).dtype == torch.float32
        a, _ = generate_ar(m, prompts, 24)
        b, _ = generate_tidar(m, prompts, 24, block_size=8)
        rates[dt] = float((a != b).any(1).float().mean())
    print(
        f"\nrows whose greedy TiDAR and AR continuations differ: fp32 {rates[torch.float32]:.0%}, "
        f"bf16 {rates[torch.bfloat16]:.0%} (48 prompts x 24 tokens, random model)"
    )
    assert rates[torch.float32] == 0.0
    assert rates[torch.bfloat16] < 0.9


# -----------------------------------------------------------------------------
# train.py: layouts, data, losses, resume, distributed, bad input


def write_corpus(path, n_lines=400, seed=0):
    """A small, learnable text: lines of Python-like assignments over a fixed vocabulary."""
    rng = np.random.default_rng(seed)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "token",
        "mask",
        "block",
        "expert",
        "router",
        "value",
    ]
    lines = [
        f"{rng.choice(words)}_{i % 7} = {rng.choice(words)}({int(rng.integers(100))})\n"
        for i in range(n_lines)
    ]
    path.write_text("".join(lines))
    return str(path)


def tiny_args(tmp_path, data, out, **kw):
    """One run's flags (--mode=ar unless given, or a resume, which keeps the run's own mode)."""
    args = dict(
        preset="tiny",
        data=data,
        out_dir=str(tmp_path / out),
        data_cache=str(tmp_path / "cache"),
        batch_size=8,
        seq_len=32,
        block_size=8,
        max_iters=20,
        warmup_iters=2,
        lr=3e-3,
        min_lr=3e-4,
        eval_interval=1000,
        eval_iters=1,
        log_interval=1000,
        seed=0,
    )
    if kw.get("init_from") != "resume":
        args["mode"] = "ar"
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def tiny_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return Zaya(ZayaConfig.from_name("tiny")).to(dtype).eval()


# -----------------------------------------------------------------------------
# TiDAR layouts and forward


def reference_layout(S, K):
    """docs/tidar.md sections 1-2 written out pair by pair. Query/key index i < S: clean token at
    position i; i >= S: the mask at position i - S. Predecessors in zaya's extended indexing (1 =
    none, j + 2 = token j)."""
    mask = torch.zeros(2 * S, 2 * S, dtype=torch.bool)
    pred = []
    for q in range(2 * S):
        pq, q_is_mask = q % S, q >= S
        for k in range(2 * S):
            pk, k_is_mask = k % S, k >= S
            if not q_is_mask and not k_is_mask:
                mask[q, k] = pk <= pq  # clean -> clean: causal
            elif q_is_mask and not k_is_mask:
                mask[q, k] = pk < (pq // K) * K  # mask -> clean: strictly before own block
            elif q_is_mask and k_is_mask:
                mask[q, k] = pk // K == pq // K  # mask -> mask: own block, both ways
        if not q_is_mask:
            p = q - 1 if pq > 0 else None  # clean t -> clean t-1
        elif pq % K == 0:
            p = pq - 1 if pq > 0 else None  # first mask of a block -> clean bK-1
        else:
            p = q - 1  # other masks -> the mask before
        pred.append(1 if p is None else p + 2)
    return torch.cat([torch.arange(S), torch.arange(S)]), torch.tensor(pred), mask


@pytest.mark.parametrize("S,K", [(6, 3), (8, 4), (8, 1), (8, 8), (12, 4), (16, 2)])
def test_tidar_train_layout_matches_the_rules(S, K):
    pos, pred, mask = tidar_train_layout(S, K)
    ref_pos, ref_pred, ref_mask = reference_layout(S, K)
    assert torch.equal(pos, ref_pos) and torch.equal(pred, ref_pred) and torch.equal(mask, ref_mask)


def test_tidar_train_layout_rejects_partial_blocks():
    with pytest.raises(ValueError, match="multiple of block_size"):
        tidar_train_layout(10, 4)


def forward_tidar(m, idx, K=None):
    """(AR logits, diffusion logits), each [B, S, V], of one TiDAR training forward over [idx | S
    masks]."""
    logits = m.lm_head(tidar_hidden(m, idx, K))
    return logits[:, : idx.shape[1]], logits[:, idx.shape[1] :]


def tidar_hidden(m, idx, K=None):
    """Hidden states [B, 2S, d] of one TiDAR training forward over [idx | S masks], as
    train.tidar_loss builds it."""
    pos, pred, mask = tidar_train_layout(idx.shape[1], K or m.config.block_size, idx.device)
    return m.forward_hidden(
        torch.cat([idx, torch.full_like(idx, m.config.mask_token_id)], 1), pos, pred, mask
    )


def test_forward_tidar_ar_half_is_the_causal_model():
    model = tiny_model()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ar, _ = forward_tidar(model, idx, 4)
        logits, _ = model(idx)
    torch.testing.assert_close(ar, logits, atol=1e-10, rtol=0)


def test_forward_tidar_mask_block_sees_only_the_prefix_before_it():
    model, S, K = tiny_model(), 16, 4
    idx = torch.randint(0, 256, (2, S))
    with torch.no_grad():
        _, diff = forward_tidar(model, idx, K)
        for b in range(S // K):
            blk = slice(b * K, (b + 1) * K)
            later = idx.clone()
            later[:, b * K :] = torch.randint(0, 256, (2, S - b * K))  # positions >= bK: no effect
            torch.testing.assert_close(
                forward_tidar(model, later, K)[1][:, blk], diff[:, blk], atol=1e-10, rtol=0
            )
            _, short = forward_tidar(model, idx[:, : (b + 1) * K], K)  # the truncated sequence
            torch.testing.assert_close(short[:, blk], diff[:, blk], atol=1e-10, rtol=0)
            if b > 0:  # the last clean token it sees
                prev = idx.clone()
                prev[:, b * K - 1] = (prev[:, b * K - 1] + 1) % 256
                assert (forward_tidar(model, prev, K)[1][:, blk] - diff[:, blk]).abs().max() > 1e-3


# -----------------------------------------------------------------------------
# pieces of train.py


def test_chunked_cross_entropy_equals_full_value_and_gradient():
    torch.manual_seed(0)
    h = torch.randn(3, 13, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (3, 13))
    y[0, :4] = -1  # ignored labels
    full = torch.nn.functional.cross_entropy(
        (h @ weight.T).flatten(0, 1), y.flatten(), ignore_index=-1
    )
    g_full = torch.autograd.grad(full, (h, weight))
    loss, hits = train.chunked_cross_entropy(h, weight, y, chunk=5)
    g = torch.autograd.grad(loss, (h, weight))
    torch.testing.assert_close(loss, full, atol=1e-6, rtol=0)
    for a, b in zip(g, g_full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert torch.equal(hits, ((h @ weight.T).argmax(-1) == y).flatten())


def test_shaped_tidar_loss_equals_a_direct_computation():
    """docs/acceptance.md's loss terms against a direct computation on a tiny float64 model: block
    position weights (slot0, exp(-(k-1)/pos_decay)), soft targets from a lone causal forward over
    x_<i (the AR head's p(x_i | x_<i)) under CE (kl) and total variation 1 - sum min(p, q) (tv), no
    AR loss on distilled rows, real_diffusion=False (real rows causal, diffusion on the distilled
    ones). float64: agreement to 1e-9 is rounding only."""
    from types import SimpleNamespace

    m = tiny_model()
    K, S = 4, 12
    w = torch.randint(0, 256, (3, S + 1), generator=torch.Generator().manual_seed(3))
    c = SimpleNamespace(
        **{
            **train.DEFAULTS,
            "mode": "tidar",
            "block_size": K,
            "pos_decay": 2.0,
            "slot0": 0.3,
            "kl": 0.6,
            "tv": 0.5,
            "alpha": 0.7,
            "loss_chunk": 5,
        }
    )
    idx = w[:, :S]
    logits_m = m.embed_tokens.weight @ tidar_hidden(m, idx, K)[:, S:].transpose(1, 2)  # [B, V, S]
    num = den = 0.0
    for b in range(3):
        for i in range(S):
            k = i % K
            wt = 0.3 if k == 0 else math.exp(-(k - 1) / 2.0)
            logq = logits_m[b, :, i].log_softmax(-1)
            ce = -logq[idx[b, i]]
            if i > 0:  # the AR head over x_<i, run on its own
                h = m.forward_hidden(idx[b : b + 1, :i], *causal_layout(i))
                p = (h[0, -1] @ m.embed_tokens.weight.T).softmax(-1)
                ce = 0.4 * ce - 0.6 * (p * logq).sum()
                ce = ce + 0.5 * (1 - torch.minimum(p, logq.exp()).sum())  # tv: TV(p, q)
            num, den = num + wt * ce, den + wt
    diff = num / den
    ar_real = F.cross_entropy(
        (m.embed_tokens.weight @ m.forward_hidden(idx[:2], *causal_layout(S)).transpose(1, 2)),
        w[:2, 1:],
    )  # rows 0, 1 are real
    loss, ar, d, _ = train.tidar_loss(m, w, c, real=2)
    torch.testing.assert_close(d, diff, atol=1e-9, rtol=0)
    torch.testing.assert_close(ar, ar_real, atol=1e-9, rtol=0)
    torch.testing.assert_close(loss, (0.7 * ar_real + diff) / 1.7, atol=1e-9, rtol=0)
    # real_diffusion=False: the same AR loss from a causal forward of the real rows, diffusion
    # from the rest
    c.real_diffusion = False
    loss2, ar2, d2, _ = train.TrainLoss(m, c)(w[:2], w[2:])
    _, _, d_extra, _ = train.tidar_loss(m, w[2:], c, real=0)
    torch.testing.assert_close(ar2, ar_real, atol=1e-9, rtol=0)
    torch.testing.assert_close(d2, d_extra, atol=1e-9, rtol=0)
    assert not torch.allclose(d_extra, diff)  # a different set of rows
    # the paper's settings give the plain mean of the hard CE over every slot
    paper = SimpleNamespace(**{**train.DEFAULTS, "mode": "tidar", "block_size": K})
    want = F.cross_entropy(logits_m, idx)
    torch.testing.assert_close(train.tidar_loss(m, w, paper)[2], want, atol=1e-9, rtol=0)


def test_self_distillation_comes_from_the_model_and_the_training_split(tmp_path):
    """The distillation rows: prompts are training-split windows, continuations are the teacher's
    own greedy tokens (generate_ar), regenerating with the same seed gives the same tokens, and a
    conversion run trains on them (its cache file appears and training proceeds)."""
    data = write_corpus(tmp_path / "corpus.txt")
    ar = train.main(tiny_args(tmp_path, data, "ar", max_iters=10))
    td = train.main(
        tiny_args(
            tmp_path,
            data,
            "td",
            mode="tidar",
            init_from=ar["ckpt"],
            max_iters=3,
            distill=0.5,
            distill_rows=6,
            distill_prompt=8,
            distill_len=40,
            real_diffusion=False,
            pos_decay=7.0,
            slot0=0.0,
            kl=1.0,
        )
    )
    assert len(td["losses"]) == 3 and all(math.isfinite(h["diff"]) for h in td["losses"])
    (path,) = (tmp_path / "cache").glob("distill-*.bin")
    train_ids, val_ids = train.load_corpus(data, "bytes", str(tmp_path / "cache"), 33)
    rows = torch.from_numpy(np.fromfile(path, dtype=train_ids.dtype).astype(np.int64)).view(6, 40)
    tr = bytes(train_ids.astype(np.uint8))
    assert all(bytes(r[:8].tolist()) in tr for r in rows)  # prompts: training split
    teacher = Zaya.from_pretrained(ar["ckpt"]).eval()
    assert torch.equal(generate_ar(teacher, rows[:, :8], 32)[0], rows)  # the teacher's greedy text
    from types import SimpleNamespace

    c = SimpleNamespace(
        **{
            **train.DEFAULTS,
            "distill_from": ar["ckpt"],
            "distill_rows": 6,
            "distill_prompt": 8,
            "distill_len": 40,
            "seed": 0,
        }
    )
    again = train.distill_corpus(c, train_ids, str(tmp_path / "again"))
    assert np.array_equal(again, rows.numpy())  # same seed, same tokens
    windows = train.get_batch(again, 64, 16)  # within a row, never across
    assert all(
        any(r[o : o + 17].tolist() == w.tolist() for r in rows for o in range(24)) for w in windows
    )
    c.seed = 1
    assert not np.array_equal(
        train.distill_corpus(c, train_ids, str(tmp_path / "other"))[:, :8], rows[:, :8].numpy()
    )
    c.seed, c.distill_temp = 0, 1.0  # sampled, as train.RECIPE distils
    hot = train.distill_corpus(c, train_ids, str(tmp_path / "hot"))
    gen = torch.Generator().manual_seed(c.seed + 2)  # distill_corpus's own draw order
    starts = torch.randint(len(train_ids) - 8, (6,), generator=gen).tolist()
    x = torch.from_numpy(np.stack([train_ids[i : i + 8].astype(np.int64) for i in starts]))
    assert torch.equal(torch.from_numpy(hot[:, :8].astype(np.int64)), x)  # training-split prompts
    assert np.array_equal(generate_ar(teacher, x, 32, 1.0, generator=gen)[0].numpy(), hot)
    assert not np.array_equal(hot, again)  # sampled, not the greedy text
    assert np.array_equal(train.distill_corpus(c, train_ids, str(tmp_path / "hot2")), hot)


def test_balancing_controller_balances_and_never_touches_skip():
    model = tiny_model(dtype=torch.float32)
    E = model.config.num_experts
    for layer in model.layers:
        layer.mlp.load = torch.tensor([30, 0, 8, 2, 0])  # E = 4 experts + skip; mean 10
    train.update_balancing_biases(model, 0.01)
    for layer in model.layers:
        b = layer.mlp.gate.balancing_biases
        assert b[0] < 0 and (b[1:E] > 0).all() and b[E] == -1.0
    # closed loop on a skewed synthetic router: argmax(p + b) with fixed probabilities p
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(
        torch.randn(4000, E + 1, generator=gen) + torch.tensor([2.0, 1.0, 0.0, -1.0, 0.0]), -1
    )
    gate = model.layers[0].mlp.gate
    imbalance = []
    for _ in range(300):
        choice = (p + gate.balancing_biases).argmax(-1)
        for layer in model.layers:
            layer.mlp.load = torch.bincount(choice, minlength=E + 1)
        imbalance.append(train.update_balancing_biases(model, 0.003))
    assert imbalance[0] > 2.0 and max(imbalance[-20:]) < 1.15 and gate.balancing_biases[E] == -1.0


def test_parse_args_is_strict_and_typed():
    o = train.parse_args(
        ["--lr=1e-3", "--max_iters=7", "--compile=True", "--mode=tidar"], train.DEFAULTS
    )
    assert (
        o == dict(lr=1e-3, max_iters=7, compile=True, mode="tidar") and type(o["max_iters"]) is int
    )
    for bad in (["--nope=1"], ["--max_iters=1.5"], ["--compile=yes"], ["max_iters=3"], ["--lr"]):
        with pytest.raises(train.UsageError):
            train.parse_args(bad, train.DEFAULTS)


def test_bytes_tokenizer_and_corpus_cache(tmp_path):
    enc, ids = train.get_tokenizer("bytes")
    assert (
        ids
        == dict(eot=256, mask=257, pad=258, vocab_size=320)
        == {
            "eot": ZayaConfig.from_name("tiny").eos_token_id,
            "mask": ZayaConfig.from_name("tiny").mask_token_id,
            "pad": 258,
            "vocab_size": ZayaConfig.from_name("tiny").vocab_size,
        }
    )
    text = "héllo <|endoftext|>\n"
    assert (
        enc.encode_ordinary(text) == list(text.encode())
        and enc.decode(enc.encode_ordinary(text)) == text
    )
    data = tmp_path / "docs"
    data.mkdir()
    for i in range(30):
        write_corpus(data / f"f{i}.txt", n_lines=5, seed=i)
    (data / "blob.bin").write_bytes(b"\0\1\2")  # binary: skipped
    train1, val1 = train.load_corpus(str(data), "bytes", str(tmp_path / "c"), 33)
    train2, val2 = train.load_corpus(str(data), "bytes", str(tmp_path / "c"), 33)  # from the cache
    assert (
        train1.dtype == np.uint16 and np.array_equal(train1, train2) and np.array_equal(val1, val2)
    )
    assert (
        train1[0] == val1[0] == 256 and (train1 == 256).sum() == 27 and (val1 == 256).sum() == 3
    )  # f2, f3, f19


def test_stdlib_corpus_files_are_sorted_sources_without_tests():
    files = train.corpus_files("stdlib")
    assert (
        len(files) > 100 and files == sorted(files) and all(rel.endswith(".py") for rel, _ in files)
    )
    assert not any(set(rel.split(os.sep)) & {"test", "tests", "site-packages"} for rel, _ in files)


def test_dry_run_8b_prints_parameters_in_seconds(capsys):
    t = time.time()
    out = train.main(
        ["--preset=zaya1-8b", "--dry_run=True", "--gpus=64", "--seq_len=4096", "--batch_size=1"]
    )
    printed = capsys.readouterr().out
    assert time.time() - t < 20 and out["params"] > 8.8e9 and 7e8 < out["active"] < 8e8
    assert f"{out['params']:,} parameters" in printed and "TiDAR" in printed and "GFLOP" in printed
    assert (
        f"checkpoint (DCP): {12 * out['params'] / 2**30:.1f} GiB on disk" in printed
        and "no full copy" in printed
    )
    assert f"its own {12 * out['params'] / 64 / 2**30:.1f} GiB" in printed  # 8.8e9 x 12 / 64 GPUs


# -----------------------------------------------------------------------------
# training runs


def test_ar_then_tidar_lower_both_losses(tmp_path):
    data = write_corpus(tmp_path / "corpus.txt")
    ar = train.main(tiny_args(tmp_path, data, "ar", max_iters=30))
    a = [h["ar"] for h in ar["losses"]]
    assert np.mean(a[-5:]) < a[0] - 1.0  # ~5.6 -> ~3 on this corpus
    td = train.main(
        tiny_args(tmp_path, data, "td", mode="tidar", init_from=ar["ckpt"], max_iters=40)
    )
    ar_l, diff_l = [h["ar"] for h in td["losses"]], [h["diff"] for h in td["losses"]]
    assert np.mean(diff_l[-5:]) < diff_l[0] - 0.3  # 3.68 -> 3.17
    assert np.mean(ar_l[-5:]) < ar_l[0]  # AR keeps improving
    assert (
        len(td["evals"][-1]["acc"]) == 8 and Zaya.from_pretrained(td["ckpt"]).config.block_size == 8
    )


def test_resume_continues_with_identical_losses(tmp_path):
    data = write_corpus(tmp_path / "corpus.txt")
    common = dict(mode="tidar", max_iters=8, lr_decay_iters=8, eval_interval=4)
    full = train.main(tiny_args(tmp_path, data, "full", **common))
    train.main(tiny_args(tmp_path, data, "split", **{**common, "max_iters": 4}))
    rest = train.main(tiny_args(tmp_path, data, "split", init_from="resume", max_iters=8))
    assert [h["iter"] for h in rest["losses"]] == [4, 5, 6, 7]
    assert rest["losses"] == full["losses"][4:]  # exact, every float
    ck = torch.load(rest["ckpt"], weights_only=True)
    assert ck["iter_num"] == 8 and ck["mode"] == "tidar" and ck["tokenizer"] == "bytes"
    assert set(ck) >= {"config", "model", "optimizer", "best_val_loss", "data", "rng", "train_cfg"}
    whole = torch.load(full["ckpt"], weights_only=True)[
        "model"
    ]  # and the same weights, bit for bit
    assert all(torch.equal(whole[k], v) for k, v in ck["model"].items())


def _train_proc(tmp_path, data, out, **kw):
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "train.py"), *tiny_args(tmp_path, data, out, **kw)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


@pytest.mark.slow
def test_sigkill_while_checkpointing_leaves_a_loadable_checkpoint(tmp_path):
    """A run that writes a checkpoint every iteration is SIGKILLed at several moments: each time the
    checkpoint on disk loads and a resumed run continues from it (atomic temp file + rename: never a
    half-written ckpt.pt).
    """
    import signal

    data = write_corpus(tmp_path / "corpus.txt")
    ckpt = tmp_path / "run" / "ckpt.pt"
    for delay in (0.5, 1.3, 2.1):
        p = _train_proc(
            tmp_path,
            data,
            "run",
            max_iters=10_000,
            eval_interval=1,
            eval_iters=1,
            **({"init_from": "resume"} if ckpt.exists() else {}),
        )
        t0 = time.time()
        while not ckpt.exists() and time.time() - t0 < 60:
            time.sleep(0.05)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        ck = torch.load(ckpt, weights_only=True)  # loads: not half-written
        assert ck["iter_num"] >= 1
    before = torch.load(ckpt, weights_only=True)["iter_num"]
    rest = train.main(
        tiny_args(
            tmp_path, data, "run", init_from="resume", max_iters=before + 2, eval_interval=1000
        )
    )
    assert [h["iter"] for h in rest["losses"]] == [before, before + 1]


def test_seq_len_beyond_context_and_unknown_tokenizer_are_one_line(tmp_path, capsys):
    data = write_corpus(tmp_path / "corpus.txt", n_lines=3000)
    with pytest.raises(train.UsageError, match="max_position_embeddings=2048"):
        train.main(tiny_args(tmp_path, data, "long", seq_len=4096))
    m = train.main(tiny_args(tmp_path, data, "ok", max_iters=1))
    ck = torch.load(m["ckpt"], weights_only=True)
    torch.save(
        {**ck, "tokenizer": "no-such-encoding"}, tmp_path / "odd.pt"
    )  # a tokenizer nobody can load
    from sample import cli_main as cli

    capsys.readouterr()
    assert cli([f"--init_from={tmp_path / 'odd.pt'}", "--max_new_tokens=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-encoding" in err[0]
    with pytest.raises(
        train.UsageError, match="no-such-encoding"
    ):  # and training from it says so too
        train.main(
            tiny_args(
                tmp_path,
                data,
                "conv",
                mode="tidar",
                init_from=str(tmp_path / "odd.pt"),
                max_iters=1,
            )
        )


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    import signal

    data = write_corpus(tmp_path / "corpus.txt")
    p = _train_proc(tmp_path, data, "run", max_iters=10_000, log_interval=1)
    p.stdout.readline()  # the run is under way
    while "iter" not in p.stdout.readline():
        pass
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err and "init_from=resume" in err, err
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert 1 <= ck["iter_num"] < 10_000


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    data = write_corpus(tmp_path / "corpus.txt")
    first = train.main(tiny_args(tmp_path, data, "run", max_iters=2, lr_decay_iters=6))
    before = open(first["ckpt"], "rb").read()
    real = train.chunked_cross_entropy
    monkeypatch.setattr(
        train, "chunked_cross_entropy", lambda *a: (real(*a)[0] * float("nan"), real(*a)[1])
    )
    with pytest.raises(train.Diverged, match="at iter 2;"):
        train.main(tiny_args(tmp_path, data, "run", init_from="resume", max_iters=6))
    assert open(first["ckpt"], "rb").read() == before


@pytest.mark.parametrize("fsdp", [False, True])
@pytest.mark.slow
def test_two_gloo_processes_match_one_with_the_same_global_batch(tmp_path, fsdp):
    """Runs in CI on the CPU (gloo), never skipped: DDP (or FSDP2) with batch_size 4 per rank x 2
    processes gives the losses of 1 process with batch_size 8, at iter 0 and after two optimizer
    steps (gradients averaged, the balancing biases updated from the all-reduced load)."""
    data = write_corpus(tmp_path / "corpus.txt")
    one = train.main(tiny_args(tmp_path, data, "one", mode="tidar", max_iters=3))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two_args = tiny_args(tmp_path, data, "two", mode="tidar", max_iters=3, batch_size=4, fsdp=fsdp)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"{HERE}/train.py",
    ]
    r = subprocess.run(cmd + two_args, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "two" / "log.json") as f:
        two = json.load(f)
    assert len(two["losses"]) == len(one["losses"]) == 3  # measured differences: <= 1e-6
    for a, b in zip(two["losses"], one["losses"]):  # iter 0, and after updates
        assert all(abs(a[k] - b[k]) < 1e-5 for k in ("loss", "ar", "diff")), (a, b)


# sharded checkpoints (FSDP2 + DCP) and shard-by-shard loading, on 2 gloo processes

PROBE = """
import json, os, runpy, signal, sys
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemWriter
sys.path.insert(0, {here!r})
import zaya
rank, log = int(os.environ["RANK"]), dict(saves=[], reads=[])
real_save, real_load, real_write = dcp.save, zaya.load_checkpoint, FileSystemWriter.write_data


def local(v):  # a DTensor's local shard, else the tensor itself
    return v.to_local() if hasattr(v, "to_local") else v


def save(state, **kw):  # every tensor a rank hands to DCP: its type, global and local shapes
    log["saves"].append([[k, type(v).__name__, list(v.shape), list(local(v).shape)]
                         for k, v in [*state["model"].items(), *[(p + "." + n, t)
                         for p, d in state["optimizer"]["state"].items() for n, t in d.items()]]
                         if hasattr(v, "shape") and v.dim()])
    return real_save(state, **kw)


def write_data(self, plan, planner):  # KILL_AT_SAVE=n: rank 1 dies after writing save n's shards
    fut = real_write(self, plan, planner)
    if rank == 1 and len(log["saves"]) == int(os.environ.get("KILL_AT_SAVE", 0)):
        os.kill(os.getpid(), signal.SIGKILL)
    return fut


def load_checkpoint(path):  # every read of a checkpoint tensor: its name, rows read, all rows
    config, parts, meta = real_load(path)
    def probe(k, shape, read):
        def r(sl):
            rows = range(*sl.indices(shape[0]))
            log["reads"].append([k, list(rows)[:1] + [len(rows)], shape[0]])
            return read(sl)
        return shape, r
    return config, {{k: probe(k, *v) for k, v in parts.items()}}, meta


dcp.save, zaya.load_checkpoint, FileSystemWriter.write_data = save, load_checkpoint, write_data
try:
    runpy.run_path({train!r}, run_name="__main__")
finally:
    name = f"probe-{{os.environ['PROBE_ID']}}-{{rank}}.json"
    with open(os.path.join({probes!r}, name), "w") as f:
        json.dump(log, f)
"""


def run_two(tmp_path, args, run_id, kill_at_save=0, timeout=300):
    """train.py on 2 gloo processes under the probe above -> (completed process, [probe of rank 0,
    1])."""
    script = tmp_path / "probe.py"
    script.write_text(
        PROBE.format(here=HERE, train=os.path.join(HERE, "train.py"), probes=str(tmp_path))
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", KILL_AT_SAVE=str(kill_at_save), PROBE_ID=run_id)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
    ]
    r = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=timeout)
    probes = [
        (
            json.loads((tmp_path / f"probe-{run_id}-{i}.json").read_text())
            if (tmp_path / f"probe-{run_id}-{i}.json").exists()
            else None
        )
        for i in range(2)
    ]
    return r, probes


def assert_every_save_sharded(probes):
    """No rank ever holds a full copy: every model and AdamW tensor handed to DCP is a DTensor whose
    local shard is at most ceil(n / 2) of its n rows."""
    for p in probes:
        assert p["saves"]
        for save in p["saves"]:
            assert len(save) > 3 * 20  # model + exp_avg + exp_avg_sq
            for name, kind, shape, local in save:
                if not name.endswith("balancing_biases"):  # a buffer, replicated
                    assert kind == "DTensor" and local[0] <= -(-shape[0] // 2), (
                        name,
                        kind,
                        shape,
                        local,
                    )


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_resumes_exactly_and_reshards_onto_one_process(tmp_path):
    """N=2 iterations, a DCP save, a resume for M=2 more: the losses and weights of 4 uninterrupted
    ones, bit for bit. The same DCP checkpoint also resumes on 1 process (DCP reshards): its weights
    arrive exactly (checked with lr 0) and AdamW's step count continues. A new run from the DCP
    folder (not a resume: converting an FSDP run) starts from its weights."""
    data = write_corpus(tmp_path / "corpus.txt")
    common = dict(mode="tidar", batch_size=4, eval_interval=2, lr_decay_iters=4, fsdp=True)
    r, probes = run_two(tmp_path, tiny_args(tmp_path, data, "full", max_iters=4, **common), "full")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_every_save_sharded(probes)
    r, _ = run_two(tmp_path, tiny_args(tmp_path, data, "split", max_iters=2, **common), "a")
    assert r.returncode == 0, r.stderr[-3000:]
    import shutil

    shutil.copytree(tmp_path / "split", tmp_path / "one")
    r, _ = run_two(
        tmp_path, tiny_args(tmp_path, data, "split", max_iters=4, init_from="resume", **common), "b"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    full, rest = (json.loads((tmp_path / d / "log.json").read_text()) for d in ("full", "split"))
    assert [h["iter"] for h in rest["losses"]] == [2, 3] and rest["losses"] == full["losses"][2:]
    assert os.listdir(tmp_path / "split" / "ckpt-dcp") == ["iter-00000004"]  # older folders removed
    a, b = Zaya.from_pretrained(str(tmp_path / "full")), Zaya.from_pretrained(
        str(tmp_path / "split")
    )
    assert a.checkpoint_meta["iter_num"] == b.checkpoint_meta["iter_num"] == 4
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    saved = Zaya.from_pretrained(str(tmp_path / "one")).state_dict()  # iteration 2, on 2 ranks
    one = train.main(
        tiny_args(
            tmp_path, data, "one", init_from="resume", max_iters=3, lr=0, min_lr=0, fsdp=False
        )
    )
    assert [h["iter"] for h in one["losses"]] == [2] and one["ckpt"].endswith("ckpt.pt")
    ck = torch.load(one["ckpt"], weights_only=True)
    assert ck["iter_num"] == 3 and all(
        torch.equal(v, ck["model"][k])
        for k, v in saved.items()
        if not k.endswith("balancing_biases")
    )  # lr 0: unchanged
    assert {int(s["step"]) for s in ck["optimizer"]["state"].values()} == {3}  # 2 loaded + 1
    dcp_dir = str(tmp_path / "full" / "ckpt-dcp" / "iter-00000004")  # a new run from it: weights
    conv = train.main(
        tiny_args(
            tmp_path, data, "conv", mode="tidar", init_from=dcp_dir, max_iters=1, lr=0, min_lr=0
        )
    )
    ck = torch.load(conv["ckpt"], weights_only=True)
    assert all(
        torch.equal(v, ck["model"][k])
        for k, v in a.state_dict().items()
        if not k.endswith("balancing_biases")
    )


@pytest.mark.slow
def test_sigkill_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path):
    """Rank 1 is SIGKILLed after writing its shards of the second save (iteration 2), before the
    save completes: the folder of iteration 1 stays the newest checkpoint, loads, and a run resumes
    from it."""
    data = write_corpus(tmp_path / "corpus.txt")
    args = tiny_args(tmp_path, data, "run", max_iters=3, eval_interval=1, batch_size=4, fsdp=True)
    r, _ = run_two(tmp_path, args, "kill", kill_at_save=2)
    assert r.returncode != 0 and "SIGKILL" in r.stderr, r.stderr[-3000:]  # rank 1, in save 2
    assert sorted(os.listdir(tmp_path / "run" / "ckpt-dcp")) == [
        "iter-00000001",
        "tmp-iter-00000002",
    ]
    assert Zaya.from_pretrained(str(tmp_path / "run")).checkpoint_meta["iter_num"] == 1
    rest = train.main(tiny_args(tmp_path, data, "run", init_from="resume", max_iters=2, fsdp=False))
    assert [h["iter"] for h in rest["losses"]] == [1]


@pytest.mark.slow
def test_fsdp_init_from_hf_reads_only_each_ranks_rows_and_exports_to_the_reference(tmp_path):
    """--init_from of a sharded native HF directory and of a legacy one, with --fsdp=True: each rank
    reads only the rows it owns (at most ceil(n/2) of each parameter's n), and after one step at lr
    0 the DCP checkpoint holds exactly Zaya.from_pretrained's weights (same logits). Its export
    loads in transformers with the same logits.
    """
    from safetensors.torch import save_file

    m = byte_model()
    m.save_pretrained(tmp_path / "native", max_shard_bytes=60_000)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    save_file({k: v.contiguous() for k, v in _to_legacy(m).items()}, legacy / "model.safetensors")
    c = m.config
    (legacy / "config.json").write_text(
        json.dumps(
            dict(
                json.loads((tmp_path / "native" / "config.json").read_text()),
                num_hidden_layers=2 * c.num_hidden_layers,
                ffn_hidden_size=2 * c.moe_intermediate_size,
                zaya_mlp_expansion=c.router_hidden_size,
            )
        )
    )
    data = write_corpus(tmp_path / "corpus.txt")
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        want = m(idx)[0]
        for src in ("native", "legacy"):
            args = tiny_args(
                tmp_path,
                data,
                f"from-{src}",
                init_from=str(tmp_path / src),
                max_iters=1,
                lr=0,
                min_lr=0,
                bias_update_rate=0,
                batch_size=4,
                fsdp=True,
            )
            r, probes = run_two(tmp_path, args, src)
            assert r.returncode == 0, r.stderr[-3000:]
            assert r.stdout.count("peak host memory") == 2  # one line per rank
            reads = {}
            for p in probes:
                for name, (first, rows), n in ([k, v, n] for k, (*v,), n in p["reads"]):
                    reads.setdefault(name, []).append((first, rows, n))
            assert set(reads) == set(m.state_dict())
            for name, got in reads.items():
                n = got[0][2]
                if name.endswith("balancing_biases"):  # buffers: whole, on each rank
                    assert [r[1] for r in got] == [n, n]
                else:  # a rank's own rows, together all
                    assert max(r[1] for r in got) <= -(-n // 2) and sum(r[1] for r in got) == n, (
                        name,
                        got,
                    )
            converted = Zaya.from_pretrained(str(tmp_path / f"from-{src}"))
            torch.testing.assert_close(converted(idx)[0], want, atol=1e-6, rtol=0)
        train.main([f"--export={tmp_path / 'hf'}", f"--init_from={tmp_path / 'from-native'}"])
        torch.testing.assert_close(reference(tmp_path / "hf")(idx).logits, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            Zaya.from_pretrained(str(tmp_path / "hf"))(idx)[0], want, atol=1e-6, rtol=0
        )
        train.main(
            [
                f"--export={tmp_path / 'native-from-legacy'}",
                f"--init_from={legacy}",
                "--dtype=bfloat16",
            ]
        )
        back = Zaya.from_pretrained(
            str(tmp_path / "native-from-legacy")
        )  # legacy -> native, in bf16
        assert back.embed_tokens.weight.dtype == torch.bfloat16 and not list(
            (tmp_path / "native-from-legacy").glob("tmp-*")
        )
        assert all(
            torch.equal(v, m.state_dict()[k].to(v.dtype)) for k, v in back.state_dict().items()
        )


def hf_tokenizer_file(path, corpus, vocab_size, special=("<eos>", "<mask>", "<pad>")):
    """A BPE tokenizer.json trained here by the `tokenizers` package on the corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = (
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
    )
    tok.train(
        [corpus],
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.save(str(path))
    return tok


def test_training_and_decoding_on_a_hugging_face_tokenizer(tmp_path, capsys):
    """--tokenizer=PATH trains on a tokenizer.json (here one trained by the `tokenizers` package):
    its <mask> is the TiDAR mask, the corpus cache holds its ids, and sample.py decodes with it. A
    missing file, and a vocabulary larger than the model's, are one line each."""
    from sample import cli_main as cli
    from cli import load_tokenizer

    data = write_corpus(tmp_path / "corpus.txt")
    tok = hf_tokenizer_file(tmp_path / "tokenizer.json", data, 300)
    assert tok.get_vocab_size() > 280  # BPE merges beyond the bytes
    out = train.main(
        tiny_args(
            tmp_path,
            data,
            "hf",
            mode="tidar",
            tokenizer=str(tmp_path / "tokenizer.json"),
            max_iters=3,
        )
    )
    m = Zaya.from_pretrained(out["ckpt"])
    assert m.config.mask_token_id == tok.token_to_id(
        "<mask>"
    ) and m.config.eos_token_id == tok.token_to_id("<eos>")
    assert m.config.vocab_size == 320  # 300 rounded up to 64s
    cache = np.fromfile(next((tmp_path / "cache").glob("tokenizer-*.train.bin")), dtype=np.uint16)
    assert (
        cache[0] == tok.token_to_id("<eos>")
        and list(cache[1:9]) == tok.encode(open(data).read()).ids[:8]
    )
    encode, decode = load_tokenizer(m)
    assert (
        decode(encode("alpha_3 = beta(12)")) == "alpha_3 = beta(12)"
        and encode("alpha") == tok.encode("alpha").ids
    )
    capsys.readouterr()
    assert cli([f"--init_from={tmp_path / 'hf'}", "--prompt=alpha_3 = ", "--max_new_tokens=6"]) == 0
    assert "alpha_3 = " in capsys.readouterr().out
    with pytest.raises(train.UsageError, match="no tokenizer file .*nope.json; do pass") as e:
        train.main(tiny_args(tmp_path, data, "x", tokenizer=str(tmp_path / "nope.json")))
    big = tmp_path / "big"
    big.mkdir()
    hf_tokenizer_file(big / "tokenizer.json", data, 400)
    with pytest.raises(
        train.UsageError, match=r"has 3[3-9]\d ids but the model's vocab_size is 320; do "
    ) as e:
        train.main(
            tiny_args(tmp_path, data, "y", mode="tidar", init_from=out["ckpt"], tokenizer=str(big))
        )
    assert "\n" not in str(e.value)


BAD_INPUTS = {
    "unknown flag": ["--nope=1"],
    "bad value": ["--batch_size=abc"],
    "block_size 0": ["--mode=tidar", "--block_size=0"],
    "block does not divide": ["--mode=tidar", "--seq_len=30", "--block_size=16"],
    "empty data": ["--data={empty}"],
    "missing init": ["--mode=tidar", "--init_from={tmp}/nothing.pt"],
    "no resume ckpt": ["--init_from=resume", "--out_dir={tmp}/fresh"],
    "corrupt ckpt": ["--mode=tidar", "--init_from={junk}"],
    "missing tokenizer": ["--tokenizer={tmp}/nope/tokenizer.json"],
    "export without checkpoint": [
        "--export={tmp}/hf",
        "--init_from=resume",
        "--out_dir={tmp}/fresh",
    ],
}


@pytest.mark.slow
def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path):
    empty, junk = tmp_path / "empty.txt", tmp_path / "junk.pt"
    empty.write_text("")
    junk.write_bytes(b"not a checkpoint")
    fmt = dict(tmp=tmp_path, empty=empty, junk=junk)
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "train.py"),
                f"--out_dir={tmp_path}/out",
                *[a.format(**fmt) for a in args],
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        for name, args in BAD_INPUTS.items()
    }
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert "; do " in lines[0] and "Traceback" not in err, (name, err)


@pytest.mark.parametrize(
    "args", [["--mode=bert"], ["--dtype=float16"], ["--lr=-1"], ["--data=/nothing/here"]]
)
def test_bad_settings_raise_usage_error_in_process(tmp_path, args):
    with pytest.raises(train.UsageError, match="; do "):
        train.main([f"--out_dir={tmp_path}", *args])


# -----------------------------------------------------------------------------
# kernels.py: each fast path equals the eager code


CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA/ROCm GPU")


def tiny_config(**kw):
    """small_config with 2 layers and no pad or bos id: the compiled tests' model."""
    return small_config(
        **{"num_hidden_layers": 2, "pad_token_id": None, "bos_token_id": None, **kw}
    )


def krandomised(config, **kw):
    return randomised(config, **{"std": 0.5, **kw})


@pytest.fixture(scope="module")
def fast_model():
    """One model on the fast paths, shared so its compiled graphs are built once."""
    m = krandomised(tiny_config())
    kernels.enable(m)
    yield m
    kernels.disable(m)


# -----------------------------------------------------------------------------
# experts


def _routing(N, E, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g).to(dtype)
    choice = torch.randint(0, E + 1, (N,), generator=g)  # E = skip
    choice[choice == 0] = 1  # expert 0 gets no token: an empty group
    return x, choice, torch.rand(N, 1, generator=g).to(dtype)


@pytest.mark.parametrize("path", ["grouped", "gathered"])
def test_expert_paths_equal_reference(path, monkeypatch):
    """experts_forward on 40 tokens, its path forced: grouped GEMMs, or the per-token gather."""
    c = tiny_config()
    ex = krandomised(c).layers[0].mlp.experts
    x, choice, w = _routing(40, c.num_experts, c.hidden_size)
    x.requires_grad_()
    want = ex(x, choice, w)
    gx, gw = torch.autograd.grad(want.square().sum(), (x, ex.gate_up_proj))
    monkeypatch.setattr(kernels, "grouped_mm_runs", lambda *a: path == "grouped")
    got = kernels.experts_forward(x, choice, w, ex.gate_up_proj, ex.down_proj)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got[choice == c.num_experts].abs().max() == 0  # skipped tokens contribute exactly zero
    for a, b in zip(torch.autograd.grad(got.square().sum(), (x, ex.gate_up_proj)), (gx, gw)):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5)


@pytest.mark.slow
def test_compiled_experts_equal_reference_with_gradients():
    """Compiled, the grouped path runs grouped_mm through the custom op (the compiler's own takes
    bf16 only)."""
    c = tiny_config()
    ex = krandomised(c).layers[0].mlp.experts
    x, choice, w = _routing(40, c.num_experts, c.hidden_size)
    assert kernels.grouped_mm_runs("cpu", torch.float32, 48, 32) and not kernels.grouped_mm_runs(
        "cpu", torch.float64
    )
    x.requires_grad_()
    want = ex(x, choice, w)
    fast = torch.compile(kernels.experts_forward, dynamic=False, fullgraph=True)
    got = fast(x, choice, w, ex.gate_up_proj, ex.down_proj)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(
        torch.autograd.grad(got.square().sum(), (x, ex.down_proj)),
        torch.autograd.grad(want.square().sum(), (x, ex.down_proj)),
    ):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5)
    exb = krandomised(c, dtype=torch.bfloat16).layers[0].mlp.experts
    with torch.no_grad():
        want = exb(x.bfloat16(), choice, w.bfloat16())
        got = kernels.experts_forward(
            x.bfloat16(), choice, w.bfloat16(), exb.gate_up_proj, exb.down_proj
        )
    torch.testing.assert_close(
        got, want, atol=2e-2 * float(want.abs().max()), rtol=2e-2
    )  # bf16 rounding


# -----------------------------------------------------------------------------
# the model on the fast paths


@pytest.mark.slow
def test_compiled_training_forward_equals_eager(fast_model):
    m, ref = fast_model, krandomised(tiny_config())  # same seed: same weights
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(5))
    m.train(), ref.train()
    outs = []
    for model in (m, ref):
        ar, diff = forward_tidar(model, idx)
        logits, targets = torch.cat([ar[:, :-1], diff], 1), torch.cat([idx[:, 1:], idx], 1)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        outs.append((ar, diff, {n: p.grad for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    m.eval(), ref.eval()
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-4, rtol=0)
    for n, gr in outs[1][2].items():
        torch.testing.assert_close(outs[0][2][n], gr, atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens_and_cache(fast_model, monkeypatch):
    ref = krandomised(tiny_config())
    idx = torch.randint(
        5, 97, (2, 24), generator=torch.Generator().manual_seed(2)
    )  # prefill > K(1+K): eager
    want, _ = generate_ar(ref, idx, 24)
    got, st_ar = generate_ar(fast_model, idx, 24)
    assert torch.equal(got, want) and len(set(want[0, 24:].tolist())) > 3
    (want_t, st_ref), b = final_cache(monkeypatch, generate_tidar, ref, idx, 24)
    (got_t, st), a = final_cache(monkeypatch, generate_tidar, fast_model, idx, 24)
    assert torch.equal(got_t, want) and torch.equal(want_t, want)
    assert st.histogram == st_ref.histogram and st.tokens_per_forward > 1
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(generate_ar(fast_model, idx, 30)[0], generate_ar(ref, idx, 30)[0])
    assert (
        torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    )  # a new cache capacity: no recompile
    assert torch.equal(a.lengths, b.lengths)
    n = int(a.lengths.min())
    torch.testing.assert_close(a.k[..., :n, :], b.k[..., :n, :], atol=1e-5, rtol=0)
    torch.testing.assert_close(a.conv, b.conv, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_cpu_decode_reads_the_cache_in_64_slot_buckets(fast_model, monkeypatch):
    """On a CPU (no device to sync with) a compiled step reads the cache only up to the 64-slot
    bucket holding its tokens, not the whole capacity (a TiDAR run's is sized for dense steps),
    through views whose writes land in the run's cache: the tokens stay the eager ones."""
    import copy

    made, real = [], copy.copy
    monkeypatch.setattr(kernels.copy, "copy", lambda x: made.append(real(x)) or made[-1])
    idx = torch.randint(5, 97, (1, 24), generator=torch.Generator().manual_seed(5))
    got, _ = generate_tidar(fast_model, idx, 40)
    monkeypatch.undo()
    assert torch.equal(got, generate_ar(krandomised(tiny_config()), idx, 40)[0])
    made = [c for c in made if isinstance(c, KVCache)]  # (copy.copy has other callers)
    capacity = made[0].capacity  # 24 + 40 + K(2 + K) = 88
    assert {c.k.shape[3] for c in made} == {64, capacity - 1} and capacity == 88  # never all of it
    assert all(c.k.data_ptr() == made[0].k.data_ptr() for c in made)


def test_compiled_tidar_pads_a_level_set_up_to_a_compiled_step_size(fast_model, monkeypatch):
    """kernels.enable has graphs for m = 1, 2, 4 mask groups (K = 4). The level set {0, 2, 3} (m =
    3) runs compiled, padded with a copy of its last group to m = 4: the eager reference's tokens
    and committed cache, and the forward never sees the unpadded size. The latency curve of the
    compiled model measures the padded step it will run.
    """
    from levels import LatencyCurve

    K = fast_model.config.block_size
    assert fast_model.step_sizes == [K * (1 + m) for m in (1, 2, 4)]
    ref = krandomised(tiny_config())
    idx = torch.randint(5, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    sizes, real = [], fast_model.forward_hidden
    monkeypatch.setattr(
        fast_model,
        "forward_hidden",
        lambda x, *a, **kw: sizes.append(x.shape[1]) or real(x, *a, **kw),
    )
    (want, st_ref), b = final_cache(monkeypatch, generate_tidar, ref, idx, 24, groups=[0, 2, 3])
    (got, st), a = final_cache(monkeypatch, generate_tidar, fast_model, idx, 24, groups=[0, 2, 3])
    assert torch.equal(got, want) and st.histogram == st_ref.histogram and st.tokens_per_forward > 1
    assert K * (1 + 4) in sizes and K * (1 + 3) not in sizes  # padded, never the odd size
    assert torch.equal(a.lengths, b.lengths)
    n = int(a.lengths.min())
    torch.testing.assert_close(a.k[..., :n, :], b.k[..., :n, :], atol=1e-5, rtol=0)
    torch.testing.assert_close(a.conv, b.conv, atol=1e-5, rtol=0)
    curve = LatencyCurve(fast_model, 1, K, 16, reps=1)
    assert curve[K * (1 + 3)] == curve[K * (1 + 4)] and set(curve) == {K * (1 + 3), K * (1 + 4)}
    other = krandomised(tiny_config())
    kernels.enable(other)  # compiles lazily: nothing yet
    assert other.step_sizes and not hasattr(kernels.disable(other), "step_sizes")


def test_fast_path_keeps_the_eager_errors_and_disable_restores(fast_model):
    cache = KVCache(fast_model.config, 1, 4)
    one = torch.ones(1, 1, dtype=torch.bool)
    cache.lengths.fill_(4)
    with pytest.raises(ValueError, match="KV cache full"):
        fast_model.forward_hidden(
            torch.tensor([[5]]),
            cache.lengths[:, None],
            torch.ones(1, 1, dtype=torch.long),
            one,
            cache,
        )
    m = krandomised(tiny_config())
    kernels.enable(m)
    assert "forward_hidden" in m.__dict__
    kernels.disable(m)
    assert (
        "forward_hidden" not in m.__dict__ and "_attend_cache" not in m.layers[0].self_attn.__dict__
    )


# -----------------------------------------------------------------------------
# the house: imports point one way, layouts live in zaya.py (STYLE.md)


PROGRAMS = ["zaya.py", "cli.py", "train.py", "sample.py", "kernels.py", "levels.py", "bench.py"]


def _our_imports(path):
    """Every module of ours that a file imports, at the top or inside a function."""
    ours = {p[:-3] for p in PROGRAMS}
    found = set()
    for node in ast.walk(ast.parse(open(os.path.join(HERE, path)).read())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & ours


def test_imports_point_one_way_towards_zaya():
    """kernels.py and levels.py import only zaya.py, and cli.py (flags, tokenizers) none of ours:
    both CLIs take it without a trip up; sample.py neither train.py nor bench.py; nothing imports
    bench.py; the graph has no cycle, so `python train.py` cannot reach bench.py's code."""
    graph = {p[:-3]: _our_imports(p) for p in PROGRAMS}
    assert graph["zaya"] == set() and graph["cli"] == set()
    assert graph["kernels"] <= {"zaya"} and graph["levels"] <= {"zaya"}
    assert not graph["sample"] & {"train", "bench"}
    assert not any("bench" in deps for deps in graph.values())

    def reach(m, seen=()):
        assert m not in seen, f"import cycle through {m}: {seen}"
        return set().union({m}, *(reach(d, seen + (m,)) for d in graph[m]))

    for m in graph:
        reach(m)
    assert "bench" not in reach("train")
    assert reach("sample") <= {"sample", "zaya", "levels", "kernels", "cli"}
    assert train.reproduce.__module__ == "train" and train.dry_run.__module__ == "train"


def _expression_shape(node):
    """An expression with every name, attribute, constant and subscript index blanked:
    q.transpose(1, 2) and k.transpose(1, 2) have one shape, model.num_params() and 2**30 two."""

    class Blank(ast.NodeTransformer):
        def visit_Name(self, n):
            return ast.Name(id="_", ctx=ast.Load())

        def visit_Constant(self, n):
            return ast.Constant(value=0)

        def visit_Attribute(self, n):
            return ast.Attribute(value=self.visit(n.value), attr="_", ctx=ast.Load())

        def visit_Subscript(self, n):
            blank = ast.Constant(value=0)
            return ast.Subscript(value=self.visit(n.value), slice=blank, ctx=ast.Load())

    return ast.dump(Blank().visit(ast.parse(ast.unparse(node), mode="eval")))


def _squeezed_assignments(source):
    """Lines that assign several names at once without being one idea (STYLE: one assignment per
    line unless the names are one idea): chains a = b = x, and a, b = x, y whose values differ in
    kind. Unpacking one value (B, T = x.shape), the same operation on several (q, k, v = q.t(),
    k.t(), v.t(), a generator over them), and sizes read off one config are one idea each."""
    bad = []
    for n in ast.walk(ast.parse(source)):
        if not isinstance(n, ast.Assign):
            continue
        parallel = isinstance(n.targets[0], ast.Tuple) and isinstance(n.value, ast.Tuple)
        if len(n.targets) > 1 or parallel and len({_expression_shape(e) for e in n.value.elts}) > 1:
            bad.append(n.lineno)
    return bad


def test_no_program_squeezes_several_assignments_onto_one_line():
    """Every program file assigns one name per line unless the names are one idea; the checker flags
    the squeezed forms the code once had (a chain, a counter beside a list, a config beside a
    time)."""
    assert {p: _squeezed_assignments(open(os.path.join(HERE, p)).read()) for p in PROGRAMS} == {
        p: [] for p in PROGRAMS
    }
    squeezed = "\n".join(
        [
            "c = self.config = config",
            "shards, size = [[]], 0",
            "nkv, hd = c.num_key_value_heads, c.head_dim",
            "x, n = tokens(c, (1, 8), d), a.new_tokens",
            "q, k = q.transpose(1, 2), k.transpose(1, 2)",
            "B, T = x.shape",
            "kl, tv = (f(x) for x in (kl, tv))",
            "lo, hi = 0.0, 1.0",
        ]
    )
    assert _squeezed_assignments(squeezed) == [1, 2, 4]


def test_files_written_for_others_follow_the_umask(tmp_path):
    """--export's config.json and safetensors, a checkpoint and a token cache get 0666 less the
    umask, as any file a program creates (the temp file they are renamed from is 0600), and leave no
    temp file."""
    old = os.umask(0o022)
    try:
        randomised(tiny_config()).save_pretrained(tmp_path / "m")
        data = write_corpus(tmp_path / "corpus.txt")
        run = train.main(tiny_args(tmp_path, data, "run", max_iters=1))
        train.main([f"--export={tmp_path / 'hf'}", f"--init_from={run['ckpt']}"])
        os.umask(0o077)
        train.main([f"--export={tmp_path / 'private'}", f"--init_from={run['ckpt']}"])
    finally:
        os.umask(old)
    mode = lambda p: os.stat(p).st_mode & 0o777
    for f in ("config.json", "model.safetensors"):
        assert mode(tmp_path / "hf" / f) == 0o644 and mode(tmp_path / "private" / f) == 0o600
        assert mode(tmp_path / "m" / f) == 0o644
    assert mode(run["ckpt"]) == 0o644
    assert all(mode(p) == 0o644 for p in (tmp_path / "cache").glob("*.bin"))
    assert not list(tmp_path.rglob("tmp-*"))


def _layout_violations(path):
    """Calls of forward_hidden whose (pos, pred, mask) do not come straight from a zaya *_layout
    call (or pass through the caller's own parameters), and attention calls made outside zaya.py."""
    tree = ast.parse(open(os.path.join(HERE, path)).read())
    bad = []
    tops = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    tops += [
        m
        for c in tree.body
        if isinstance(c, ast.ClassDef)
        for m in c.body
        if isinstance(m, ast.FunctionDef)
    ]
    for fn in tops:  # nested functions and lambdas count as their outer
        params = {
            a.arg
            for n in ast.walk(fn)
            if isinstance(n, (ast.FunctionDef, ast.Lambda))
            for a in n.args.args
        }
        from_layout = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                f = node.value.func
                name = f.id if isinstance(f, ast.Name) else getattr(f, "attr", "")
                if name.endswith("_layout"):
                    for tgt in node.targets:
                        from_layout |= {n.id for n in ast.walk(tgt) if isinstance(n, ast.Name)}
        for node in ast.walk(fn):
            if not (
                isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "forward_hidden"
            ):
                continue
            args = node.args[1:4]
            if len(args) == 1 and isinstance(args[0], ast.Starred):
                f = args[0].value.func
                ok = isinstance(args[0].value, ast.Call) and getattr(f, "id", "").endswith(
                    "_layout"
                )
            else:
                ok = all(isinstance(a, ast.Name) and a.id in from_layout | params for a in args)
            if not ok:
                bad.append(f"{path}:{node.lineno}")
    source = open(os.path.join(HERE, path)).read()
    for word in (
        "scaled_dot_product_attention",
        "flex_attention",
        "create_block_mask",
        ".tril(",
        ".triu(",
    ):
        if word in source:
            bad.append(f"{path}: {word}")
    return bad


def test_only_zaya_builds_masks_positions_and_predecessors():
    """Every forward outside zaya.py gets its positions, predecessors and mask from a zaya layout
    function, and only zaya.py calls attention. The checker itself flags a hand-built mask."""
    assert [v for p in PROGRAMS if p != "zaya.py" for v in _layout_violations(p)] == []
    probe = os.path.join(HERE, "tmp-layout-probe.py")
    with open(probe, "w") as f:
        f.write(
            "def f(m, x, cache):\n    t = torch.arange(4)\n"
            "    return m.forward_hidden(x, t, t + 1, t[:, None] >= t[None, :], cache)\n"
        )
    try:
        assert _layout_violations("tmp-layout-probe.py") == ["tmp-layout-probe.py:3"]
    finally:
        os.remove(probe)


def test_kernels_holds_only_what_programs_call():
    """Every function in kernels.py is reachable from what train.py, sample.py or bench.py call
    (kernels.X), through kernels.py's own calls and registrations; none is there only for tests."""
    tree = ast.parse(open(os.path.join(HERE, "kernels.py")).read())
    bodies = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    names_in = lambda node: {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    roots = {
        n
        for n in bodies
        for p in ("train.py", "sample.py", "bench.py")
        if f"kernels.{n}(" in open(os.path.join(HERE, p)).read()
    }
    assert "enable" in roots
    for stmt in tree.body:  # module level: the custom ops' registrations
        if not isinstance(stmt, ast.FunctionDef):
            roots |= names_in(stmt) & set(bodies)
    reachable, frontier = set(roots), set(roots)
    while frontier:
        new = (names_in(bodies[frontier.pop()]) & set(bodies)) - reachable
        reachable |= new
        frontier |= new
    assert set(bodies) == reachable, set(bodies) - reachable


# -----------------------------------------------------------------------------
# GPU only (each has a CPU twin above)


@needs_cuda
def test_cuda_decode_graphs_and_grouped_experts():
    ref = krandomised(tiny_config(), device="cuda")
    fast = krandomised(tiny_config(), device="cuda")
    kernels.enable(fast)
    idx = torch.randint(5, 97, (2, 24), generator=torch.Generator().manual_seed(2)).cuda()
    want, _ = generate_ar(ref, idx, 24)
    assert torch.equal(generate_ar(fast, idx, 24)[0], want) and torch.equal(
        generate_tidar(fast, idx, 24)[0], want
    )
    ex = krandomised(tiny_config(), dtype=torch.bfloat16, device="cuda").layers[0].mlp.experts
    x, choice, w = (t.cuda() for t in _routing(64, 4, 48, torch.bfloat16))
    want = ex(x, choice, w)
    got = kernels.experts_forward(x, choice, w, ex.gate_up_proj, ex.down_proj)
    torch.testing.assert_close(got, want, atol=2e-2 * float(want.abs().max()), rtol=2e-2)


@pytest.mark.slow
def test_reproduction_pipeline_end_to_end(tmp_path, capsys):
    """--pipeline=scratch on a tiny corpus and preset: AR pretraining, TiDAR conversion, the
    held-out decoding report. The converted model lands in out_dir/ckpt.pt (where sample.py looks),
    its greedy lossless decoding is AR's, and on this trained model mix at w=0.5 commits at least as
    many tokens per forward as lossless. The report leads with the speed table (AR, TiDAR, lookup
    at T=0 and 1) and gives the GPU prediction and the held-out loss per byte."""
    data = write_corpus(tmp_path / "corpus.txt", n_lines=3000)
    out = tmp_path / "out"
    res = train.main(
        [
            f"--data={data}",
            f"--out_dir={out}",
            "--pipeline=scratch",
            "--preset=tiny",
            "--max_iters=150",
            "--tokenizer=bytes",
            "--seq_len=64",
            "--batch_size=8",
            "--distill_rows=64",
            "--distill_len=128",
            "--eval_interval=1000",
            "--log_interval=1000",
        ]
    )
    printed = capsys.readouterr().out
    assert (
        (out / "ckpt.pt").exists()
        and (out / "ar" / "ckpt.pt").exists()
        and (out / "decode.json").exists()
    )
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"AR", "lossless", "lossless T=1 seed 0", "mix w=0.5", "prompt lookup"}
    assert all(r["block"] == 16 and r["sd"] >= 0 for r in res["rows"])
    assert rows["lossless"]["tokens_per_forward"] > 1.0  # drafts do get accepted
    assert rows["mix w=0.5"]["tokens_per_forward"] >= rows["lossless"]["tokens_per_forward"]
    assert (
        rows["lossless"]["log_likelihood"] == rows["AR"]["log_likelihood"]
    )  # lossless greedy is AR's text
    assert (
        "lossless" in printed
        and "continuation of held-out code" in printed
        and "already in the context" in printed
    )
    speed = {r["name"]: r for r in res["speed"]}  # the report leads with the speed
    assert printed.index("speed on this machine") < printed.index("held-out decoding")
    assert {f"{n} T={t}" for n in ("AR", "TiDAR lossless", "prompt lookup") for t in (0, 1)} == set(
        speed
    )
    # byte tokens: a byte each (broken UTF-8 decodes to the 3-byte U+FFFD: more, never fewer)
    assert speed["AR T=0"]["speedup"] == 1.0 and all(
        r["bytes_per_s"] >= r["tokens_per_s"] > 0 for r in speed.values()
    )
    assert set(res["gpus"]) == {
        f"{g} B={b}" for g in ("H100", "H200", "MI300X") for b in (1, 16, 64)
    }
    assert (
        "Zyphra measured, H100: B=1 2.60x" in printed
        and 0 < res["loss"]["nats_per_byte"] <= res["loss"]["nats_per_token"]
    )
    assert list((out / "data").glob("distill-*.bin"))  # the default self-distils
    model = Zaya.from_pretrained(str(out)).eval()
    assert model.checkpoint_meta["mode"] == "tidar" and model.config.block_size == 16
    prompt = torch.tensor(train.get_tokenizer("bytes")[0].encode("alpha_3 = "))[None]
    assert torch.equal(generate_tidar(model, prompt, 40)[0], generate_ar(model, prompt, 40)[0])


@pytest.mark.slow
def test_default_pipeline_converts_the_bundled_hf_base_and_reports_beside_the_bundled_conversion(
    tmp_path, monkeypatch, capsys
):
    """`python train.py` on a tiny corpus from a tiny HF base put where the bundled one lives
    (train.MODELS): --pipeline=base --export makes the base (bf16 safetensors, the BPE's
    tokenizer.json, training_log.json); the default pipeline loads it through --init_from's HF path,
    converts it and --export puts the conversion where the bundled one lives; its report then runs
    the bundled conversion under the same evaluation, ends with the side-by-side summary, and (the
    same weights, rounded to bf16) commits nearly the same greedy tokens per forward."""
    from safetensors import safe_open

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(24):
        write_corpus(corpus / f"f{i}.py", n_lines=150, seed=i)
    models = tmp_path / "models"
    monkeypatch.setattr(train, "MODELS", models)
    flags = [
        f"--data={corpus}",
        "--preset=tiny",
        "--seq_len=32",
        "--batch_size=8",
        "--eval_iters=1",
        "--eval_interval=1000",
        "--log_interval=1000",
        "--distill_rows=16",
        "--distill_prompt=16",
        "--distill_len=64",
    ]
    base = models / "zaya-small"
    res = train.main(
        [
            "--pipeline=base",
            "--tokenizer=bpe300",
            "--max_iters=40",
            f"--out_dir={tmp_path / 'b'}",
            f"--export={base}",
            *flags,
        ]
    )
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_log.json"} <= set(
        os.listdir(base)
    )
    assert (
        json.loads((base / "training_log.json").read_text())["mode"] == "ar"
        and "bundled" not in res
    )
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if "bias" not in k} == {torch.bfloat16}
    assert (
        "greedy continuation of held-out code" in capsys.readouterr().out
    )  # an AR base: no TiDAR report
    res = train.main(
        [
            "--pipeline=default",
            "--max_iters=30",
            f"--out_dir={tmp_path / 'c'}",
            f"--export={models / 'zaya-small-tidar'}",
            *flags,
        ]
    )
    printed = capsys.readouterr().out
    cfg = Zaya.from_pretrained(str(tmp_path / "c")).checkpoint_meta["train_cfg"]
    assert (
        cfg["init_from"] == str(base) and cfg["tokenizer"] == str(base) and cfg["mode"] == "tidar"
    )
    assert "the bundled conversion" in printed and "=== summary" in printed
    assert (
        printed.count("speed on this machine") == 1
        and res["speed"] == []
        and res["bundled"]["speed"]
    )
    assert (
        printed.index("speed on this machine")
        < printed.index("this run's conversion")
        < printed.index("=== summary")
    )
    tpf = [{r["name"]: r["tokens_per_forward"] for r in x["rows"]} for x in (res, res["bundled"])]
    # the bundled copy is the same weights rounded to bf16 (8 significant bits), which flips a few
    # near-tied greedy choices: tokens per forward agree to 0.25, not exactly
    assert set(tpf[0]) == set(tpf[1]) and abs(tpf[0]["lossless"] - tpf[1]["lossless"]) < 0.25
    assert res["bundled"]["loss"]["nats_per_byte"] == pytest.approx(
        res["loss"]["nats_per_byte"], rel=0.02
    )


@pytest.mark.skipif(
    not os.environ.get("ZAYA1_8B"),
    reason="set ZAYA1_8B=/path/to/ZAYA1-8B (the real weights, ~18 GB)",
)
def test_real_zaya1_8b_reference_numbers():
    """docs/zaya1.md section 4, the upstream integration test's numbers (real 8B weights, bf16):
    runs where they exist."""
    m = Zaya.from_pretrained(os.environ["ZAYA1_8B"], dtype=torch.bfloat16).eval()
    prompt = torch.tensor([[2, 9259, 236888, 2088, 740, 564, 6361, 611, 3124, 236881, 106]])
    out, _ = generate_ar(m, prompt, 16)
    assert out[0, 11:].tolist() == [
        107,
        262146,
        108,
        9259,
        236888,
        2088,
        740,
        564,
        6361,
        611,
        3124,
        236881,
        108,
        236769,
        10282,
        236787,
    ]


def test_bench_runs_every_row_on_one_models_weights(tmp_path, monkeypatch, capsys):
    """python bench.py --init_from: the reference, training and TiDAR rows all on that model, whose
    weights no row changes (its training steps run at lr 0); the compiled path (here its
    bookkeeping, kernels.enable patched out) runs the same rows."""
    import bench

    randomised(tiny_config()).save_pretrained(tmp_path / "m")
    seen, real = [], bench.generate_tidar
    total = lambda m: float(sum(p.detach().double().sum() for p in m.parameters()))
    monkeypatch.setattr(bench.kernels, "enable", lambda m, **kw: None)
    spy = lambda m, *a, **kw: seen.append(total(m)) or real(m, *a, **kw)  # noqa: E731
    monkeypatch.setattr(bench, "generate_tidar", spy)
    bench.main(
        [
            "--init_from",
            str(tmp_path / "m"),
            "--reps",
            "1",
            "--new_tokens",
            "8",
            "--prompt_len",
            "8",
            "--train_batch",
            "2",
            "--train_len",
            "16",
            "--prefix",
            "16",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert len(set(seen)) == 1 and seen[0] == total(Zaya.from_pretrained(tmp_path / "m"))
    assert "transformers ZayaForCausalLM.generate" in out and "train AR step, ours compiled" in out
    for tag in ("eager", "compiled"):
        assert all(f"TiDAR {name} (K=4) {tag}" in out for name in ("lossless", "mix", "auto"))


def test_roofline_step_cost_is_the_hand_arithmetic(tmp_path, capsys):
    """bench.py --roofline (docs/tidar.md section 6) against sums written out from the tiny config's
    fields: experts woken under uniform top-1 routing, an AR and a TiDAR step's bytes and FLOPs
    (exact: the tiny config's E = 4 makes the woken count exact here), the KV cache linear in
    context and batch, the 8B's ~2.6 GB AR step and ~17.7 GB dense step, and one table row per
    device x context x batch."""
    import re
    from bench import main as bench_main
    from levels import step_cost

    c = ZayaConfig.from_name("tiny")
    V, d, L, E, I, R = (
        c.vocab_size,
        c.hidden_size,
        c.num_hidden_layers,
        c.num_experts,
        c.moe_intermediate_size,
        c.router_hidden_size,
    )
    nq, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    C = (nq + nkv) * hd  # CCA's [q|k] channels
    q, k, v_cur, v_del, o = (
        d * nq * hd,
        d * nkv * hd,
        d * nkv * hd // 2,
        d * nkv * hd // 2,
        nq * hd * d,
    )
    convs = (C * 2 + C) + (C * hd * 2 + C)  # depthwise, grouped: weights + biases
    norms = d + d + 2 * 4 * d  # 2 RMSNorms, 2 ResidualScales (4 vectors)
    router = (d * R + R) + R + 2 * (R * R + R) + R * (E + 1)  # down_proj, norm, fc1, fc2, out_proj
    per_layer = q + k + v_cur + v_del + o + convs + nkv + norms + router  # nkv: key temperatures
    shared = L * per_layer + (L - 1) * R + 2 * d + d  # EDA scales (layers > 0), input, final norm
    expert = 2 * I * d + d * I  # gate_up, down
    m = Zaya(c)
    assert m.num_params() == shared + L * E * expert + V * d  # the tally is the model's
    assert m.num_params(active=True) == shared + L * expert
    cost, ctx = step_cost(c), 100
    kv_token = L * 2 * (nkv * hd) * 2  # K and V per layer, bf16
    state_row = L * (2 * C + nkv * hd // 2) * 4  # 2 raw conv inputs + delayed value, fp32
    ar_bytes = (
        2 * shared
        + 2 * L * 1 * expert
        + 2 * V * d  # weights, 1 expert a layer, the head
        + 2 * 1 * d
        + ctx * kv_token
        + state_row
    )  # 1 embedding row, the cache, CCA state
    ar_flops = 2 * (shared + L * expert + V * d) + L * 4 * nq * hd * (ctx + 1)  # + QK and PV
    assert cost(1, 1, ctx) == (ar_bytes, ar_flops)
    assert (
        E == 4
        and cost(1, 2, 0)[0]
        == 2 * (shared + L * 4 * (1 - (3 / 4) ** 2) * expert + V * d + 2 * d) + state_row
    )
    B, n = 3, c.block_size * (1 + c.block_size)  # a dense TiDAR step: 272 tokens a row
    assert E * (1 - (1 - 1 / E) ** (B * n)) == E  # 816 tokens wake all 4 (exactly, in floats)
    td_bytes = 2 * (shared + L * E * expert + V * d + B * n * d) + B * (ctx * kv_token + state_row)
    td_flops = B * n * (2 * (shared + L * expert + V * d) + L * 4 * nq * hd * (ctx + n))
    assert cost(B, n, ctx) == (td_bytes, td_flops)
    kv = lambda B, ctx: cost(B, 1, ctx)[0] - cost(B, 1, 0)[0]
    assert kv(1, ctx) == ctx * kv_token and kv(1, 8 * ctx) == 8 * kv(1, ctx)
    assert kv(5, ctx) == pytest.approx(5 * kv(1, ctx), rel=1e-12)
    c8 = step_cost(ZayaConfig.from_name("zaya1-8b"))  # docs/tidar.md 6: ~2.6, 16-17.7 GB
    assert 2.5e9 < c8(1, 1, 0)[0] < 2.7e9 and 15.5e9 < c8(1, 32, 0)[0] < c8(1, 272, 0)[0] < 17.8e9
    g = ZayaConfig.from_name("zaya1-8b")  # n tokens' bytes beyond one token's: the
    for n in (2, 32, 272):  # experts woken, E(1 - (1 - 1/E)^n) a layer
        woken = 1 + ((c8(1, n, 0)[0] - c8(1, 1, 0)[0]) / 2 - (n - 1) * g.hidden_size) / (
            g.num_hidden_layers * 3 * g.moe_intermediate_size * g.hidden_size
        )
        assert woken == pytest.approx(16 * (1 - (15 / 16) ** n), rel=1e-9) and g.num_experts == 16
    bench_main(["--roofline", f"--acceptance={tmp_path / 'none.json'}"])
    out = capsys.readouterr().out
    cells = re.findall(
        r"^ +(H100|H200|MI300X) +B=1: ([\d.]+)x +B=4: ([\d.]+)x +B=16: ([\d.]+)x +B=64: ([\d.]+)x$",
        out,
        re.M,
    )
    assert len(cells) == 12  # 3 GPUs x (4k, 32k) x (measured, anchor acceptance)
    measured, anchor = [float(c[1]) for c in cells[:6]], [float(c[1]) for c in cells[6:]]
    assert all(
        a > m for a, m in zip(anchor, measured)
    )  # more accepted tokens per step: faster, same steps
    assert "Zyphra measured, H100: B=1 2.60x, B=8 1.80x, B=16 1.66x, B=64 1.13x" in out
    assert (
        "docs/tidar.md's bound, H100: B=1 1.2x" in out
        and "bytes per step, batch 1, 4k: AR 2." in out
    )


@pytest.mark.slow
def test_every_flag_reaches_the_pipeline_and_convert_reuses_an_ar_checkpoint(tmp_path, capsys):
    """Flags without --mode run the default pipeline, and reach each stage end to end:
    --block_size=8 trains the conversion AND the report at block 8 (report rows, decode.json's
    per-slot acceptance, the converted model's config). --pipeline=convert converts an existing AR
    checkpoint with the default recipe (train.RECIPE, self-distilled text) and reports, without
    pretraining again; a convert without --init_from, or --pipeline beside --mode, is one clear
    error."""
    data = write_corpus(tmp_path / "corpus.txt", n_lines=1500)
    out = tmp_path / "out"
    common = [
        f"--data={data}",
        "--preset=tiny",
        "--max_iters=6",
        "--seq_len=32",
        "--batch_size=4",
        "--distill_rows=16",
        "--distill_prompt=16",
        "--distill_len=64",
        "--eval_iters=1",
        "--log_interval=1000",
    ]
    res = train.main(
        [f"--out_dir={out}", "--pipeline=scratch", "--tokenizer=bytes", "--block_size=8", *common]
    )
    assert (out / "ar" / "ckpt.pt").exists() and (out / "ckpt.pt").exists()
    assert {r["block"] for r in res["rows"]} == {8} and len(res["acceptance"]) == 9
    assert "block 8, every level drafted" in capsys.readouterr().out
    model = Zaya.from_pretrained(str(out))
    assert model.config.block_size == 8 and model.checkpoint_meta["train_cfg"]["max_iters"] == 6
    conv = tmp_path / "conv"
    base = str(out / "ar" / "ckpt.pt")
    res = train.main(
        [
            "--pipeline=convert",
            f"--init_from={base}",
            f"--out_dir={conv}",
            "--block_size=4",
            *common,
        ]
    )
    assert not (conv / "ar").exists() and list((conv / "data").glob("distill-*.bin"))
    assert {r["block"] for r in res["rows"]} == {4}
    cfg = Zaya.from_pretrained(str(conv)).checkpoint_meta["train_cfg"]
    assert {k: cfg[k] for k in train.RECIPE} == train.RECIPE and cfg["init_from"] == base
    bad_runs = {"--pipeline=convert": "do pass --init_from", "--pipeline=eval --mode=ar": "one or"}
    for bad, msg in bad_runs.items():
        with pytest.raises(train.UsageError, match=msg):
            train.main([*bad.split(), f"--out_dir={tmp_path / 'bad'}", *common])


def test_every_document_the_code_cites_is_in_the_repository():
    """A clone is complete: every document under docs/ that a program, test or the README cites
    exists, every "docs/<name>.md section N" names a heading of it, and nothing points outside the
    repository (to the team's reference shelf). The check itself fails on a citation of a missing
    section."""
    import re

    files = PROGRAMS + ["test_zaya.py", "README.md"]
    text = {f: open(os.path.join(HERE, f)).read() for f in files}
    cited = {
        (m[1], m[2])
        for t in text.values()
        for m in re.finditer(r"docs/(\w+)\.md(?:,? sections? ([\d.]+))?", t)
    }
    assert {name for name, _ in cited} >= {"tidar", "zaya1", "acceptance", "results"}

    def has(name, section):
        path = os.path.join(HERE, "docs", f"{name}.md")
        heads = [l for l in open(path).read().splitlines() if l.startswith("#")]
        return not section or any(re.match(rf"#+ {re.escape(section)}\.? ", h) for h in heads)

    assert [c for c in cited if not has(*c)] == []
    assert not has("tidar", "99")
    assert not [f for f, t in text.items() if "shared" + "/docs" in t or "../" + "shared" in t]


def test_bpe_tokenizer_is_trained_on_the_training_files_only(tmp_path, capsys):
    """--tokenizer=bpeN trains a byte-level BPE of N ids on the training split of --data only: a
    word that fills the held-out files (crc32 of the path % 20 == 0) stays in pieces, while a word
    as frequent in the training files becomes one token. ZAYA1's special ids (<pad> 0, <bos> 2,
    <mask> 4; <eos> 1 ends documents); trained once and cached; a run trains on it, its checkpoint
    names the file, and sample.py decodes with it."""
    import zlib
    from tokenizers import Tokenizer

    names = [f"m{i}.py" for i in range(400)]
    held = [n for n in names if zlib.crc32(n.encode()) % 20 == 0][:3]
    kept = [n for n in names if zlib.crc32(n.encode()) % 20][:3]
    (tmp_path / "corpus").mkdir()
    for n in held:
        (tmp_path / "corpus" / n).write_text("heldoutonlyword = 1\n" * 400)
    for n in kept:
        (tmp_path / "corpus" / n).write_text("trainonlyword = 1\n" * 400)
    data = str(tmp_path / "corpus")
    run = train.main(tiny_args(tmp_path, data, "bpe", tokenizer="bpe300", max_iters=1))
    path = torch.load(run["ckpt"], weights_only=True)["tokenizer"]
    assert path.endswith(".json") and os.path.dirname(path) == str(tmp_path / "cache")
    tok = Tokenizer.from_file(path)
    assert 261 < tok.get_vocab_size() <= 300  # fewer: no pair repeats past that
    assert [tok.token_to_id(t) for t in train.BPE_SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert len(tok.encode("trainonlyword").ids) == 1 and len(tok.encode("heldoutonlyword").ids) > 4
    mtime = os.path.getmtime(path)
    train.main(tiny_args(tmp_path, data, "again", tokenizer="bpe300", max_iters=1))
    assert os.path.getmtime(path) == mtime  # cached, not retrained
    from sample import cli_main

    capsys.readouterr()
    assert (
        cli_main(
            [
                f"--init_from={tmp_path / 'bpe'}",
                "--sampler=ar",
                "--prompt=trainonlyword",
                "--max_new_tokens=4",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("trainonlyword")
