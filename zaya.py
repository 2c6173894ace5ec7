"""
ZAYA1 in one file: the model, its inference cache, the TiDAR layouts and Hugging Face checkpoints.

ZAYA1 (Zyphra, 2025) is a decoder-only MoE transformer. Each layer is
  Compressed Convolutional Attention (CCA, arXiv 2510.04476): q/k from two kernel-2 convolutions
    over time plus a "qk-mean" residual, values half from the current token and half from the
    previous one, L2 qk-norm with a learned per-KV-head key temperature, partial NeoX RoPE, GQA;
  a top-1 MoE whose router is a small MLP fed by a state carried across layers (EDA), with balancing
    biases that steer only the choice, and a 17th "skip" class that computes nothing;
and learned residual scaling around both, with the residual stream kept in fp32.
Facts: docs/zaya1.md. The parity oracle is transformers' ZayaForCausalLM (v5.24.0).

TiDAR (arXiv 2511.08923) needs attention masks and CCA time-mixing other than "causal over a flat
sequence". So there is ONE general forward, `forward_hidden(idx, pos, pred, mask, cache)`: every
token has a position id, a predecessor (the token CCA's convolutions and delayed value read as
"t-1", see docs/tidar.md section 2), and a boolean attention mask. The plain causal
forward, the TiDAR training layout and the single-forward TiDAR decode step are just different
(pos, pred, mask) built by the layout functions below, the only place the mask predicates live.
"""
import functools
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as grad_checkpoint

# -----------------------------------------------------------------------------
# config


@dataclass
class ZayaConfig:
    """Field names follow transformers' ZayaConfig; the defaults are the ZAYA1-8B shape."""
    vocab_size: int = 262272
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 128
    num_experts: int = 16
    moe_intermediate_size: int = 2048
    router_hidden_size: int = 256
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    rope_theta: float = 5_000_000.0
    partial_rotary_factor: float = 0.5
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    mask_token_id: int | None = None   # TiDAR's [M]; the diffusion checkpoint uses id 4
    block_size: int = 16               # TiDAR draft block K
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_key_value_heads * self.head_dim % 2:
            raise ValueError("num_key_value_heads * head_dim must be even "
                             "(half the values are delayed)")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ValueError(f"{name}={v} is outside the vocabulary "
                                 f"(vocab_size={self.vocab_size})")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @property
    def rotary_dim(self):
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_name(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# train.py's byte-level tokenizer: 256 bytes + <|endoftext|> 256 + <|mask|> 257 (+ pad 258).
_BYTES = dict(vocab_size=320, pad_token_id=258, bos_token_id=256, eos_token_id=256,
              mask_token_id=257, max_position_embeddings=2048, rope_theta=10_000.0)
PRESETS = {
    "zaya1-8b": dict(pad_token_id=0, bos_token_id=2, eos_token_id=106, mask_token_id=4),
    "tiny": dict(_BYTES, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_experts=4, moe_intermediate_size=64,
                 router_hidden_size=32),
    "small": dict(_BYTES, hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=32, num_experts=8, moe_intermediate_size=256,
                  router_hidden_size=64),
    "medium": dict(_BYTES, hidden_size=384, num_hidden_layers=8, num_attention_heads=6,
                   num_key_value_heads=2, head_dim=64, num_experts=16, moe_intermediate_size=512,
                   router_hidden_size=128)}

# -----------------------------------------------------------------------------
# layouts: (pos, pred, mask) for every way the model is run. pred indexes the "extended" sequence
# [cached token L-2, cached token L-1, current token 0, ..., current token T-1]; so pred = 1 means
# "the last cached token" (zeros when there is no cache: the reference's left zero padding),
# pred = j + 2 means current token j. mask[q, k] = True where current query q may attend to
# current key k; every query also sees the whole cached prefix.


def causal_layout(T, device=None, start=0):
    """Plain AR: positions start..start+T-1, predecessor t-1, causal mask. Shapes: [T], [T], [T, T]
    (positions [B, T] when start is a [B, 1] tensor of cached lengths)."""
    t = torch.arange(T, device=device)
    return start + t, t + 1, t[:, None] >= t[None, :]


def ar_step_layout(lengths):
    """One AR decode token per row after a cache of lengths [B]: positions [B, 1], predecessor the
    last cached token [1], mask [1, 1]."""
    return causal_layout(1, lengths.device, lengths[:, None])


def tidar_train_layout(S, K, device=None):
    """TiDAR training layout over [clean x_0..x_{S-1} | S masks] (docs/tidar.md sections 1-2).

    Shapes [2S], [2S], [2S, 2S]. clean->clean causal; mask->clean only strictly before the mask's
    own block; mask->mask within its block. Predecessors: clean t -> clean t-1; first mask of block
    b -> clean bK-1; other masks -> the mask before."""
    if K < 1 or S % K:
        raise ValueError(f"seq_len {S} must be a positive multiple of block_size {K}")
    t = torch.arange(S, device=device)
    pos = torch.cat([t, t])
    is_mask = torch.arange(2 * S, device=device) >= S
    blk = pos // K
    qm, km = is_mask[:, None], is_mask[None, :]
    mask = ((~qm & ~km & (pos[None, :] <= pos[:, None]))       # clean -> clean: causal
            | (qm & ~km & (pos[None, :] < blk[:, None] * K))   # mask -> clean: before own block
            | (qm & km & (blk[None, :] == blk[:, None])))      # mask -> mask: own block
    pred_clean = t + 1                                         # ext index of clean t-1 is (t-1)+2
    pred_mask = torch.where(t % K == 0, t + 1, S + t + 1)     # clean bK-1, or mask t-1
    return pos, torch.cat([pred_clean, pred_mask]), mask


def tidar_prefill_layout(lengths, T, K):
    """TiDAR prefill (docs/tidar.md section 3): prompts right-padded to T (row b holds lengths[b]
    tokens), then K masks at positions L_b..L_b+K-1, whose predecessor chain starts at the row's
    last prompt token. Shapes [B, T+K], [B, T+K], [B, T+K, T+K]."""
    t = torch.arange(T + K, device=lengths.device)
    P = lengths[:, None]                                    # [B, 1]
    pos = torch.where(t < T, t, P + t - T)
    pred = torch.where(t == T, P + 1, t + 1)                # ext index of prompt token P-1 is P+1
    qm, km = (t >= T)[:, None], (t >= T)[None, :]
    real = t[None, None, :] < lengths[:, None, None]        # [B, 1, T+K]: a real prompt token
    mask = ((~qm & ~km & (t[None, :] <= t[:, None]))[None]  # prompt -> prompt: causal
            | (qm & ~km)[None] & real                       # masks -> the row's prompt
            | (qm & km)[None])                              # masks -> masks: bidirectional
    return pos, pred, mask


def tidar_step_layout(K, groups=None, device=None, start=0):
    """Single-forward TiDAR decode step (docs/tidar.md section 3), at positions start + offsets
    (start: the committed length L, 0 or a [B, 1] tensor). Built once per (K, groups, device).

    Query = [d_0..d_{K-1} | group g_0 | group g_1 | ...], each group K masks; `groups` (default all
    0..K-1) says which acceptance levels get a draft. Returns offsets (position - L), pred, mask for
    K + K*len(groups) tokens: drafts are causal among themselves; group g sees d_0..d_g and itself
    (bidirectionally), its predecessor chain starts at d_g."""
    groups = tuple(range(K)) if groups is None else tuple(groups)
    offs, pred, mask = _tidar_step(K, groups, torch.device(device or "cpu"))
    return start + offs, pred, mask


@functools.lru_cache(maxsize=64)
def _tidar_step(K, groups, device):
    j = torch.arange(K, device=device)
    N = K + K * len(groups)
    offs = [j]                                        # d_j at L+j
    preds = [j + 1]                                   # predecessor d_{j-1}, or the cache's last
    owner = torch.full((N,), -1, device=device)       # -1 for drafts, else the group's level
    for i, g in enumerate(groups):
        base = K + i * K                              # query index of the group's first slot
        offs.append(g + 1 + j)
        preds.append(torch.where(j == 0, torch.full_like(j, g + 2), base + j + 1))
        owner[base:base + K] = g
    q = torch.arange(N, device=device)[:, None]       # query index
    k = torch.arange(N, device=device)[None, :]       # key index
    grp_q, grp_k = (q - K) // K, (k - K) // K         # their mask groups (drafts: -1)
    mask = ((q < K) & (k <= q)                                       # drafts: causal
            | (q >= K) & (k < K) & (k <= owner[:, None])             # group g -> d_0..d_g
            | (q >= K) & (k >= K) & (grp_q == grp_k))                # group -> itself
    return torch.cat(offs), torch.cat(preds), mask

# -----------------------------------------------------------------------------
# inference cache


class KVCache:
    """Static-shape cache: per-layer K/V [B, n_kv, capacity, hd], the CCA state and per-row lengths.

    A forward writes every query token's K/V at slots L_b.. and keeps its raw conv inputs aside;
    `commit(n)` then keeps only the first n_b of them per row (the rest, e.g. TiDAR's rejected
    drafts and mask groups, are truncated away) and sets the CCA state to that of the last kept
    token, without recomputation. CCA state per layer: raw conv inputs [q|k] of the last two
    committed tokens [B, 2, C] and the last token's delayed-value projection [B, hv], kept in fp32
    (fp64 for a float64 model) as the reference does for serving."""

    def __init__(self, config, batch_size, capacity, dtype=torch.float32, device=None):
        L = config.num_hidden_layers
        nkv, hd = config.num_key_value_heads, config.head_dim
        C = (config.num_attention_heads + nkv) * hd
        self.k = torch.zeros(L, batch_size, nkv, capacity, hd, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        state = torch.float64 if dtype == torch.float64 else torch.float32
        self.conv = torch.zeros(L, batch_size, 2, C, dtype=state, device=device)
        self.vdel = torch.zeros(L, batch_size, nkv * hd // 2, dtype=state, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.capacity = capacity
        self.pending = [None] * L             # per layer: (c_ext, vdel_ext) of the last forward

    def mask(self, mask):
        """A forward's mask among its T query tokens, [T, T] or [B, T, T], as one over the key
        slots [0, S), [B, T, S]: each query sees its row's cached prefix, and the query tokens at
        slots L_b.. as `mask` says. S = max L + T, or under the compiler, the capacity."""
        L = self.lengths                                         # [B]
        T = mask.shape[-1]
        compiled = torch.compiler.is_compiling()                 # kernels.py checks the capacity
        S = self.k.shape[3] if compiled else int(L.max()) + T    # k.shape: dynamic when compiled
        if not compiled and S > self.capacity:
            raise ValueError(f"KV cache full: {S - T} + {T} tokens > capacity {self.capacity}")
        rel = torch.arange(S, device=L.device)[None, :] - L[:, None]   # [B, S]: key slot - L_b
        cur = mask.expand(len(L), T, T).gather(2, rel.clamp(0, T - 1)[:, None].expand(-1, T, S))
        return (rel < 0)[:, None, :] | cur & (rel < T)[:, None]        # prefix | own mask

    def update(self, i, k, v, c_ext, v_ext, S):
        """Layer i's forward: k, v [B, T, nkv, hd] go to slots L_b..L_b+T-1, (c_ext, v_ext) aside
        for commit; returns the keys and values of slots [0, S), [B, S, nkv, hd]."""
        rows = torch.arange(len(k), device=k.device)[:, None]                      # [B, 1]
        slots = self.lengths[:, None] + torch.arange(k.shape[1], device=k.device)  # [B, T]
        self.k[i][rows, :, slots] = k.to(self.k.dtype)
        self.v[i][rows, :, slots] = v.to(self.v.dtype)
        self.pending[i] = (c_ext, v_ext)
        return (self.k[i, :, :, :S].transpose(1, 2).to(k.dtype),
                self.v[i, :, :, :S].transpose(1, 2).to(v.dtype))

    def commit(self, n):
        """Keep row b's first n[b] tokens of the last forward (n: LongTensor [B]; 0: keep none)."""
        n = n.to(self.lengths.device)
        rows = torch.arange(len(n), device=n.device)
        cols = torch.stack([n, n + 1], 1)                    # [B, 2]: ext tokens L+n-2, L+n-1
        for i, (c_ext, v_ext) in enumerate(self.pending):   # ext index of the last kept is n + 1
            self.conv[i] = c_ext[rows[:, None], cols].to(self.conv.dtype)
            self.vdel[i] = v_ext[rows, n + 1].to(self.vdel.dtype)
        self.lengths += n
        self.pending = [None] * len(self.pending)

# -----------------------------------------------------------------------------
# the model


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # w * normalise(x in fp32), cast back before the weight (not 1 + w)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class ResidualScale(nn.Module):
    """h_new = (branch + b_h) * s_h + (residual + b_r) * s_r; the residual stays fp32."""

    def __init__(self, dim):
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(dim))
        self.hidden_states_bias = nn.Parameter(torch.zeros(dim))
        self.residual_scale = nn.Parameter(torch.ones(dim))
        self.residual_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, branch, residual):
        return ((branch + self.hidden_states_bias) * self.hidden_states_scale
                + (residual + self.residual_bias) * self.residual_scale)


def apply_rope(x, cos, sin):
    """Partial NeoX RoPE, rotate_half on the first rotary_dim = 2h channels of each head: (x1, x2)
    -> (x1 cos - x2 sin, x2 cos + x1 sin). x [B,T,H,hd], cos and sin [B,T,1,h]."""
    h = cos.shape[-1]
    x1, x2, xp = x.split([h, h, x.shape[-1] - 2 * h], -1)     # split: backward is one cat
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, xp], -1)


def predecessor_rows(pred):
    """pred [B, T] -> [B*T]: each token's predecessor as a row of an extended sequence (B, 2+T, C)
    flattened to (B*(2+T), C), for every layer's CCA (pred >= 1: extended token 0 is only read by
    the convolution at token 1). index_select copies whole rows; its backward adds them back."""
    B, T = pred.shape
    return (pred + (T + 2) * torch.arange(B, device=pred.device)[:, None]).flatten()


class CCAProjection(nn.Module):
    def __init__(self, c):
        super().__init__()
        nq, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        C = (nq + nkv) * hd
        self.q_proj = nn.Linear(c.hidden_size, nq * hd, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, nkv * hd, bias=False)
        self.v_proj_current = nn.Linear(c.hidden_size, nkv * hd // 2, bias=False)
        self.v_proj_delayed = nn.Linear(c.hidden_size, nkv * hd // 2, bias=False)
        self.conv_qk_depthwise = nn.Conv1d(C, C, 2, groups=C)   # weights only; applied by hand
        self.conv_qk_grouped = nn.Conv1d(C, C, 2, groups=nq + nkv)


class CCA(nn.Module):
    """Compressed Convolutional Attention in its GQA form (docs/zaya1.md section 2.1)."""

    def __init__(self, c, layer_idx):
        super().__init__()
        self.c = c
        self.layer_idx = layer_idx
        self.qkv_proj = CCAProjection(c)
        self.qk_norm = nn.Module()
        self.qk_norm.temp = nn.Parameter(torch.zeros(c.num_key_value_heads))   # per KV head, keys
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, rows, mask, cache):
        """x [B, T, d]; rows = predecessor_rows(pred); mask [T, S] or [B, T, S] over S = T keys, or
        over the cache's first S key slots (KVCache.mask)."""
        c = self.c
        p = self.qkv_proj
        B, T, _ = x.shape
        nq, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        G = nq // nkv                                                  # query heads per KV head
        nh = nq + nkv                                                  # q and k heads
        q0, k0 = p.q_proj(x), p.k_proj(x)                      # (B, T, nq*hd), (B, T, nkv*hd)

        # qk-mean residual: each query head averaged with its KV head, keys = mean over the group
        q_res = (q0.view(B, T, nkv, G, hd) + k0.view(B, T, nkv, 1, hd)) / 2   # (B, T, nkv, G, hd)
        qk_res = torch.cat([q_res.view(B, T, nq, hd), q_res.mean(3)], 2)   # (B, T, nh, hd)

        # two kernel-2 convolutions on the raw [q|k] channels along the predecessor chain: the
        # depthwise one at every (extended) token, then the grouped one reading it at pred(t) and t
        raw = torch.cat([q0, k0], -1)                                  # (B, T, C)
        prev = (cache.conv[self.layer_idx].to(raw.dtype) if cache is not None
                else raw.new_zeros(B, 2, raw.shape[-1]))               # (B, 2, C)
        c_ext = torch.cat([prev, raw], 1)                              # (B, 2+T, C)
        c1 = c_ext.flatten(0, 1).index_select(0, rows).view(B, T, -1)  # at pred(t): (B, T, C)
        w0, w1 = p.conv_qk_depthwise.weight[:, 0].t().contiguous()     # taps (C,): 0 the older
        b1 = p.conv_qk_depthwise.bias
        h = c1 * w0 + raw * w1 + b1                                    # (B, T, C)
        h_1 = prev[:, :1] * w0 + prev[:, 1:] * w1 + b1                 # at "L-1" (bias if none)
        h_ext = torch.cat([torch.zeros_like(h_1), h_1, h], 1)          # (B, 2+T, C)
        h_p = h_ext.flatten(0, 1).index_select(0, rows).view(B * T, nh, hd)    # at pred(t)
        h = torch.stack([h_p, h.view(B * T, nh, hd)], 2).flatten(2)    # (BT, group, tap in)
        w2 = p.conv_qk_grouped.weight.view(nh, hd, hd, 2).permute(0, 3, 2, 1)  # (g, tap, in, out)
        qk = torch.bmm(h.transpose(0, 1), w2.reshape(nh, 2 * hd, hd))  # (group, BT, out)
        qk = qk.transpose(0, 1).view(B, T, nh, hd) + p.conv_qk_grouped.bias.view(nh, hd) + qk_res

        # values: half the channels from this token, half the predecessor's delayed projection
        vd = p.v_proj_delayed(x)                                       # (B, T, hv)
        prev_v = (cache.vdel[self.layer_idx].to(vd.dtype)[:, None] if cache is not None
                  else vd.new_zeros(B, 1, vd.shape[-1]))               # (B, 1, hv)
        v_ext = torch.cat([torch.zeros_like(prev_v), prev_v, vd], 1)   # (B, 2+T, hv)
        v_prev = v_ext.flatten(0, 1).index_select(0, rows).view(B, T, -1)   # (B, T, hv)
        v = torch.cat([p.v_proj_current(x), v_prev], -1).view(B, T, nkv, hd)  # (B, T, nkv, hd)

        # L2 qk-norm to sqrt(hd), key temperature per KV head (1 for the queries), partial RoPE
        temp = F.pad(self.qk_norm.temp, (nq, 0), value=1.0)[:, None]   # (nh, 1)
        qk = qk * (hd**0.5 / qk.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(qk.dtype).eps))
        q, k = apply_rope(qk * temp, cos, sin).split([nq, nkv], 2)     # (B, T, nq|nkv, hd)
        if cache is not None:                                          # (B, S, nkv, hd)
            k, v = cache.update(self.layer_idx, k, v, c_ext, v_ext, mask.shape[-1])
        attn_mask = mask[:, None] if mask.dim() == 3 else mask         # (B, 1, T, S) or (T, S)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T|S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nq * hd))   # y: (B, nq, T, hd)


class Router(nn.Module):
    """ZAYA1 router: down-proj + EDA state, RMSNorm, fc1, GELU, fc2, GELU, out_proj: E+1 classes."""

    def __init__(self, c, layer_idx):
        super().__init__()
        E = c.num_experts
        R = c.router_hidden_size
        self.down_proj = nn.Linear(c.hidden_size, R)
        if layer_idx > 0:
            self.router_states_scale = nn.Parameter(torch.ones(R))
        self.router_mlp = nn.Module()
        self.router_mlp.norm = RMSNorm(R, c.rms_norm_eps)
        self.router_mlp.fc1 = nn.Linear(R, R)
        self.router_mlp.fc2 = nn.Linear(R, R)
        self.router_mlp.out_proj = nn.Linear(R, E + 1, bias=False)
        self.register_buffer("balancing_biases", torch.tensor([0.0] * E + [-1.0]))  # argmax only

    def forward(self, x, r):
        z = self.down_proj(x)
        if r is not None and hasattr(self, "router_states_scale"):
            z = z + r * self.router_states_scale           # EDA: carry the previous layer's state
        m = self.router_mlp
        logits = m.out_proj(F.gelu(m.fc2(F.gelu(m.fc1(m.norm(z))))))
        probs = logits.softmax(-1)                                   # [B,T,E+1]
        choice = (probs.detach().float() + self.balancing_biases).argmax(-1)   # [B,T]
        weight = probs.gather(-1, choice[..., None])                 # top-1 prob, NOT renormalised
        return choice, weight, z


class Experts(nn.Module):
    dispatch = None   # kernels.enable: host-sync-free, traced by torch.compile instead of the loop

    def __init__(self, c):
        super().__init__()
        E, I, d = c.num_experts, c.moe_intermediate_size, c.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, d))    # rows 0..I-1 gate, I..2I-1 up
        self.down_proj = nn.Parameter(torch.empty(E, d, I))

    def forward(self, x, choice, weight):
        """Reference dispatch: tokens sorted by class (stably), a loop over the experts that got
        tokens, back to token order; x and the expert weights are indexed once (split, unbind), so
        backward fills no zeros per expert. x [N,d], choice [N] (E = skip: zero), weight [N,1]."""
        if Experts.dispatch is not None and torch.compiler.is_compiling():
            return Experts.dispatch(x, choice, weight, self.gate_up_proj, self.down_proj)
        if x.is_meta:                                          # shapes only (e.g. the 8B on meta)
            return torch.zeros_like(x)
        counts = torch.bincount(choice, minlength=self.gate_up_proj.shape[0] + 1).tolist()
        order = choice.argsort(stable=True)                    # [N], the skip class last
        xs = x.index_select(0, order).split(counts)           # the tokens of each class
        ys = []
        for xe, w_gu, w_down in zip(xs, self.gate_up_proj.unbind(0), self.down_proj.unbind(0)):
            if len(xe):
                gate, up = F.linear(xe, w_gu).chunk(2, -1)
                ys.append(F.linear(F.silu(gate) * up, w_down))
        y = torch.cat(ys + [x.new_zeros(counts[-1], x.shape[1])])   # the skip class: zero
        return (torch.empty_like(x).index_copy_(0, order, y) * weight).to(x.dtype)


class MoE(nn.Module):
    def __init__(self, c, layer_idx):
        super().__init__()
        self.gate = Router(c, layer_idx)
        self.experts = Experts(c)
        self.load = None                                # tokens per class of the last forward

    def forward(self, x, r):
        B, T, d = x.shape
        choice, weight, r = self.gate(x, r)
        if not x.is_meta:                                              # tokens per class
            E = self.experts.gate_up_proj.shape[0]
            self.load = (choice.flatten()[:, None] == torch.arange(E + 1, device=x.device)).sum(0)
        y = self.experts(x.reshape(B * T, d), choice.flatten(), weight.reshape(B * T, 1))
        return y.view(B, T, d), r


class Block(nn.Module):
    def __init__(self, c, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = CCA(c, layer_idx)
        self.post_attention_residual_scale = ResidualScale(c.hidden_size)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MoE(c, layer_idx)
        self.post_mlp_residual_scale = ResidualScale(c.hidden_size)

    def forward(self, h, r, cos, sin, rows, mask, cache):
        dt = self.input_layernorm.weight.dtype                       # h is the fp32 residual stream
        a = self.self_attn(self.input_layernorm(h.to(dt)), cos, sin, rows, mask, cache)
        h = self.post_attention_residual_scale(a, h)
        m, r = self.mlp(self.post_attention_layernorm(h.to(dt)), r)
        return self.post_mlp_residual_scale(m, h), r


class Zaya(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.input_hidden_states_scale = nn.Parameter(torch.ones(c.hidden_size))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(c.hidden_size))
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.grad_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Init for training from scratch. Linear/embedding/expert weights N(0, 0.02), output
        projections (o_proj, expert down_proj) N(0, 0.02/sqrt(2L)) as GPT-2; conv weights N(0, 0.02)
        with zero biases (so q, k start close to the qk-mean residual); key temperature 1 (the
        reference's 0 zeroes every key); norms and residual scales 1, residual biases 0; router
        state scale 1; balancing biases 0 with the skip class at -1 (never chosen)."""
        std = self.config.initializer_range
        out_std = self.config.initializer_range / math.sqrt(2 * len(self.layers))
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "experts.down_proj")):
                nn.init.normal_(p, 0.0, out_std)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, std)
            elif name.endswith(("temp", "scale", "norm.weight", "layernorm.weight")):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
        biases = torch.tensor([0.0] * self.config.num_experts + [-1.0])
        for layer in self.layers:
            layer.mlp.gate.balancing_biases.copy_(biases)

    def num_params(self, active=False):
        """Parameters (tied embedding once), or those used per token: no embedding, one expert."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            E = self.config.num_experts
            experts = [layer.mlp.experts for layer in self.layers]
            n -= self.embed_tokens.weight.numel() + sum(
                (E - 1) * (x.gate_up_proj.numel() + x.down_proj.numel()) // E for x in experts)
        return n

    def rope(self, pos, dtype):
        """cos, sin [B,T,1,rotary_dim/2] at positions pos [B,T], one per frequency (apply_rope)."""
        r = self.config.rotary_dim
        exponents = torch.arange(0, r, 2, device=pos.device, dtype=torch.float) / r
        inv_freq = 1.0 / (self.config.rope_theta ** exponents)
        f = (pos[..., None].float() * inv_freq)[:, :, None]
        return f.cos().to(dtype), f.sin().to(dtype)

    def forward_hidden(self, idx, pos, pred, mask, cache=None):
        """The one general forward. idx, pos, pred [B,T] (or [T], broadcast); mask [T,T] or [B,T,T]
        bool. With a cache, pos is absolute and every query also sees the cached prefix. Returns the
        final-normed hidden states [B,T,d] in the model's dtype."""
        B, T = idx.shape
        pos, pred = pos.expand(B, T), pred.expand(B, T)
        n_ctx = self.config.max_position_embeddings
        check = not pos.is_meta and not torch.compiler.is_compiling()   # kernels.py checks before
        if check and int(pos.max()) >= n_ctx:
            raise ValueError(f"the input reaches position {int(pos.max())} but the model's context "
                             f"is max_position_embeddings={n_ctx} tokens; shorten it")
        dt = self.embed_tokens.weight.dtype
        e = self.embed_tokens(idx)
        h = ((e + self.input_hidden_states_bias) * self.input_hidden_states_scale).float()
        cos, sin = self.rope(pos, dt)
        mask = cache.mask(mask) if cache is not None else mask        # [B, T, key slots]
        rows = predecessor_rows(pred)
        r = None                                                       # the router's EDA state
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                h, r = grad_checkpoint(layer, h, r, cos, sin, rows, mask, cache,
                                       use_reentrant=False)
            else:
                h, r = layer(h, r, cos, sin, rows, mask, cache)
        return self.norm(h.to(dt))

    def lm_head(self, h):
        return F.linear(h, self.embed_tokens.weight)                   # tied embeddings

    def forward(self, idx, targets=None):
        """As nanoGPT: logits [B,T,V]; with targets [B,T] (-1 = ignore), the mean cross-entropy."""
        pos, pred, mask = causal_layout(idx.shape[1], idx.device)
        logits = self.lm_head(self.forward_hidden(idx, pos, pred, mask))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    # -------------------------------------------------------------------------
    # checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        """Load a local HF directory (native or legacy Megatron layout, single or sharded
        safetensors) or train.py's checkpoint (ckpt.pt, a DCP folder, the out_dir holding them).
        Built on the meta device, then each tensor is read and assigned: one copy of the weights."""
        config, parts, meta = load_checkpoint(path)
        with torch.device("meta"):
            model = cls(config)
        model.checkpoint_meta = meta                       # e.g. the tokenizer a run trained with
        check_tensors(path, model.state_dict(), parts)
        sd = {k: read(slice(None)) for k, (_, read) in parts.items()}
        dtype = dtype or next(iter(sd.values())).dtype
        model.load_state_dict({k: v.to(device, torch.float32 if k.endswith("balancing_biases")
                                       else dtype) for k, v in sd.items()}, assign=True)
        return model

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30):
        save_hf(path, self.config, self.state_dict(), max_shard_bytes=max_shard_bytes)

# -----------------------------------------------------------------------------
# checkpoint formats


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the path and every problem."""


def _atomic_write(path, write):
    """write(tmp_path) then rename over path, so a crash never leaves a half-written file. The file
    gets the usual permissions, 0666 less the umask (mkstemp's own are 0600: owner only)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix="tmp-")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_hf(path, config, tensors, read=None, max_shard_bytes=5 * 2**30):
    """The native HF layout that transformers' ZayaForCausalLM loads: config.json, safetensors
    files of max_shard_bytes (+ index), each via a temp name, from tensors {our name: tensor}, or
    meta tensors (sizes) and read(names) -> {name: tensor}: one file's tensors at a time."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    shards = [[]]                                                      # tensor names per file
    size = 0                                                           # bytes in shards[-1]
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    names = ["model.safetensors"] if len(shards) == 1 else names
    for name, keys in zip(names, shards):
        sd = read(keys) if read else {k: tensors[k] for k in keys}
        sd = {"model." + k: v.detach().contiguous().cpu() for k, v in sd.items()}
        _atomic_write(os.path.join(path, name), lambda f: save_file(sd, f, {"format": "pt"}))
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {"model." + k: n for n, s in zip(names, shards) for k in s}}
        _atomic_write(os.path.join(path, "model.safetensors.index.json"),
                      lambda f: Path(f).write_text(json.dumps(index, indent=2)))
    _atomic_write(os.path.join(path, "config.json"),
                  lambda f: Path(f).write_text(json.dumps(hf_config(config), indent=2)))


def hf_config(c):
    """Our config as the native config.json of transformers' ZayaConfig (plus the TiDAR fields)."""
    rope = {"rope_type": "default", "rope_theta": c.rope_theta,
            "partial_rotary_factor": c.partial_rotary_factor}
    d = {k: v for k, v in asdict(c).items() if k not in ("rope_theta", "partial_rotary_factor")}
    return dict(architectures=["ZayaForCausalLM"], model_type="zaya", **d, num_experts_per_tok=1,
                cca_time0=2, cca_time1=2, tie_word_embeddings=True, lm_head_bias=False,
                rope_parameters={"hybrid": rope, "hybrid_sliding": dict(rope)})


# legacy (Megatron) config keys -> ours, with a transform (80 sub-layers -> 40 layers, etc.)
_LEGACY_CONFIG = dict(num_hidden_layers=("num_hidden_layers", lambda n: n // 2),
                      ffn_hidden_size=("moe_intermediate_size", lambda n: n // 2),
                      zaya_mlp_expansion=("router_hidden_size", int),
                      num_query_groups=("num_key_value_heads", int), kv_channels=("head_dim", int),
                      norm_epsilon=("rms_norm_eps", float), rotary_base=("rope_theta", float),
                      rotary_percent=("partial_rotary_factor", float))


def config_from_hf(d):
    """ZayaConfig from a config.json dict, native or legacy."""
    d = dict(d)
    if is_legacy_config(d):
        for old, (new, f) in _LEGACY_CONFIG.items():
            if old in d:
                d[new] = f(d.pop(old))
    if d.get("num_experts_per_tok", 1) != 1 or d.get("moe_router_topk", 1) != 1:
        raise CheckpointError("only top-1 routing (num_experts_per_tok=1) exists in ZAYA1")
    if (d.get("cca_time0", 2), d.get("cca_time1", 2)) != (2, 2):
        raise CheckpointError("only CCA kernel sizes cca_time0 = cca_time1 = 2 are supported")
    rope = d.get("rope_parameters") or {}
    rope = rope.get("hybrid", rope)
    for k in ("rope_theta", "partial_rotary_factor"):
        if k in rope and k not in d:
            d[k] = rope[k]
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        d["eos_token_id"] = eos[0]
    names = {f.name for f in fields(ZayaConfig)}
    return ZayaConfig(**{k: v for k, v in d.items() if k in names})


def is_legacy_config(d):
    return "ffn_hidden_size" in d or "zaya_mlp_expansion" in d or "num_query_groups" in d


def _rename(name, table):
    """Replace the first table key that is a dotted prefix of name."""
    a = next((a for a in table if (name + ".").startswith(a + ".")), None)
    return table[a] + name[len(a):] if a else name


# legacy sub-layer tensor name prefixes -> ours (the first that matches)
_ATTN = {"qkv.linear_q": "qkv_proj.q_proj", "qkv.linear_k": "qkv_proj.k_proj",
         "qkv.val_proj1": "qkv_proj.v_proj_current", "qkv.val_proj2": "qkv_proj.v_proj_delayed",
         "qkv.conv_qk.0": "qkv_proj.conv_qk_depthwise", "qkv.temp": "qk_norm.temp",
         "qkv.conv_qk.1": "qkv_proj.conv_qk_grouped"}
_ROUTER = {"rmsnorm_eda": "router_mlp.norm", "router_mlp.0": "router_mlp.fc1",
           "router_mlp.2": "router_mlp.fc2", "router_mlp.4": "router_mlp.out_proj"}
_LEGACY = {**{f"self_attn.{a}": f"self_attn.{b}" for a, b in _ATTN.items()},
           **{f"zaya_block.router.{a}": f"mlp.gate.{b}" for a, b in _ROUTER.items()},
           "zaya_block.router": "mlp.gate"}


def legacy_name(k, n_layers):
    """A legacy Megatron tensor name (80 sub-layers, docs/zaya1.md section 3.2) -> (our name,
    expert): expert e of a layer is row e of our stacked tensor; None for every other tensor."""
    k = k.removeprefix("model.")
    if not k.startswith("layers."):                     # embeddings; after the last sub-layer
        return _rename(k, {"res_scale": f"layers.{n_layers - 1}.post_mlp_residual_scale",
                           "final_norm": "norm"}), None
    _, j, rest = k.split(".", 2)
    j = int(j)
    i, odd = divmod(j, 2)                               # our layer, the sub-layer's half
    if rest.startswith("res_scale."):
        s = rest[len("res_scale."):]
        return (f"input_{s}" if j == 0 else f"layers.{i}.post_attention_residual_scale.{s}" if odd
                else f"layers.{i - 1}.post_mlp_residual_scale.{s}"), None
    if rest.startswith("zaya_block.experts.local_experts."):
        e, fc, _ = rest[len("zaya_block.experts.local_experts."):].split(".", 2)
        name = {"linear_fc1": "gate_up_proj", "linear_fc2": "down_proj"}.get(fc, fc)
        return f"layers.{i}.mlp.experts.{name}", int(e)
    if rest.startswith("input_norm."):
        rest = ("post_attention_layernorm" if odd else "input_layernorm") + rest[len("input_norm"):]
    return f"layers.{i}.{_rename(rest, _LEGACY)}", None


def check_tensors(path, expected, parts):
    """CheckpointError naming every missing, unexpected and wrong-shaped tensor of a checkpoint's
    parts {name: (shape, read)} against a model's state dict."""
    got = {k: tuple(shape) for k, (shape, _) in parts.items()}
    bad = {"missing": set(expected) - set(got), "unexpected": set(got) - set(expected),
           "wrong shape": {f"{k} {got[k]} (expected {tuple(v.shape)})" for k, v in expected.items()
                           if got.get(k, tuple(v.shape)) != tuple(v.shape)}}
    if any(bad.values()):
        raise CheckpointError(f"checkpoint {path} does not match its config; " + "; ".join(
            f"{what}: {', '.join(sorted(names))}" for what, names in bad.items() if names))


def latest_checkpoint(out_dir):
    """train.py's newest checkpoint in out_dir, None if none: ckpt.pt (one process) or the last
    complete DCP folder ckpt-dcp/iter-N (FSDP), whichever was written last."""
    dcp = sorted(Path(out_dir, "ckpt-dcp").glob("iter-*"))[-1:]     # the newest complete folder
    paths = [p for p in [Path(out_dir, "ckpt.pt"), *dcp] if p.exists()]
    return str(max(paths, key=os.path.getmtime)) if paths else None


def _read_fail(path, e):
    return CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}"[:300].splitlines()[0])


def load_checkpoint(path):
    """(ZayaConfig, parts, metadata) from any supported checkpoint, CheckpointError otherwise.
    parts: {our name: (shape, read)}, nothing read yet: read(slice) returns those rows (dim 0),
    reading only their bytes from safetensors (safe_open) or a mmapped ckpt.pt; a DCP folder
    reads one whole tensor. Metadata: our checkpoints' other entries (tokenizer, iter_num, ...);
    for DCP, also its path; for HF, the dir."""
    path = os.path.isdir(path) and latest_checkpoint(path) or path
    if os.path.isfile(os.path.join(path, "meta.json")):                 # train.py's DCP folder
        import torch.distributed.checkpoint as dcp
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # no_dist: we know
        meta = json.loads(Path(path, "meta.json").read_text())
        info = dcp.FileSystemReader(path).read_metadata().state_dict_metadata

        def read(sl, k):                      # one process, no collectives: any rank may call it
            t = {k: torch.empty(tuple(info[k].size), dtype=info[k].properties.dtype)}
            dcp.load(t, checkpoint_id=path, no_dist=True)
            return t[k][sl]
        parts = {k[len("model."):]: (tuple(v.size), functools.partial(read, k=k))
                 for k, v in info.items() if k.startswith("model.")}
        return ZayaConfig(**meta["config"]), parts, dict(meta, dcp=path)
    if os.path.isfile(path):                                           # train.py's ckpt.pt
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            meta = {k: v for k, v in ck.items() if k != "model"}    # mmapped, as the weights
            return (ZayaConfig(**ck["config"]), {k: (v.shape, v.__getitem__)
                                                 for k, v in ck["model"].items()}, meta)
        except Exception as e:
            raise _read_fail(f"checkpoint {path}", e) from None
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path} is neither a checkpoint file nor a directory with "
                              "config.json or ckpt.pt")
    try:
        config = config_from_hf(raw := json.loads(Path(cfg_path).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"bad config {cfg_path}: {e}") from None
    index = os.path.join(path, "model.safetensors.index.json")
    files = (sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
             if os.path.isfile(index) else sorted(f for f in os.listdir(path)
                                                  if f.endswith(".safetensors")))
    if not files:
        raise CheckpointError(f"{path} has config.json but no *.safetensors weights")
    return config, hf_parts(path, files, raw, config.num_hidden_layers), {"hf_dir": path}


def hf_parts(path, files, raw, n_layers):
    """load_checkpoint's parts of an HF directory's safetensors files, legacy names renamed per
    tensor; rows lo:hi of a stacked expert tensor are legacy experts lo..hi-1."""
    from safetensors import safe_open
    legacy = is_legacy_config(raw)
    sources = {}                                   # ours -> {expert or None: (file, name)}
    for name in files:
        try:
            f = safe_open(os.path.join(path, name), "pt")
            for k in f.keys():
                ours, e = legacy_name(k, n_layers) if legacy else (k.removeprefix("model."), None)
                sources.setdefault(ours, {})[e] = (f, k)
        except Exception as e:
            raise _read_fail(os.path.join(path, name), e) from None
    sources.pop("lm_head.weight", None)                                # tied to the embedding

    def part(src):
        if None in src:                                                # one tensor, sliced
            s = src[None][0].get_slice(src[None][1])
            return tuple(s.get_shape()), lambda sl: s[sl] if s.get_shape() else s[:]
        one = tuple(src[0][0].get_slice(src[0][1]).get_shape())       # stacked experts
        return (len(src), *one), lambda sl: torch.cat(     # a rank may own none (64 ranks, E 16)
            [src[e][0].get_tensor(src[e][1])[None] for e in range(*sl.indices(len(src)))]
            or [torch.empty(0, *one)])
    return {k: part(src) for k, src in sources.items()}
