"""
Fast paths for zaya.py and sample.py. The eager code there is the reference; every function here is tested equal
to it (test_zaya.py), and `--compile=False` simply never calls this file.

What is fused, and why (style of nanochat's optim.py: plain functions under torch.compile(dynamic=False,
fullgraph=True), one graph per shape, scalars as 0-D tensors so a new value never recompiles):
- attention: flex_attention with BlockMasks derived from zaya's dense layout masks (the mask_mod indexes the dense
  tensor, so the TiDAR predicates live only in zaya.py). The training mask over [clean | mask] is ~75% empty and
  flex skips the empty 128x128 blocks that SDPA-with-a-bool-mask computes. (zaya.CCA calls SDPA itself, so the
  model uses `attention` only once CCA exposes that call.)
- experts: zaya.Experts loops over experts after a host sync (.tolist()). Here tokens are sorted by expert and two
  grouped GEMMs (F.grouped_mm, wrapped as a custom op so the compiler takes it in every dtype) run over the sorted
  rows. For a few tokens (decode: N <= E), or where grouped_mm does not run (`grouped_mm_runs`), each token gathers
  its expert's weights and one bmm runs: static shapes, reading only the chosen experts.
- residual_norm: zaya.ResidualScale and the next sublayer's RMSNorm in one pass over the fp32 residual stream.
- greedy_verify: sample._verify for the lossless sampler at temperature 0, with no host sync.
- chunked_cross_entropy: loss AND gradients chunk by chunk in the forward (Liger's fused linear cross-entropy),
  so the [N, V] fp32 logits never exist.
- decode: `enable(model)` runs forward_hidden as one compiled graph per query length (1 for AR, K(1+K) for a TiDAR
  step) over the static KVCache: keys are the cache's whole capacity under a mask instead of zaya's data-dependent
  int(L.max()) slots; the capacity is the one dynamic dimension, so a new generate call never recompiles. On
  CUDA/ROCm the graph is replayed as a CUDA graph (mode="reduce-overhead").
Backends: torch.compile picks Triton on CUDA and ROCm and C++/OpenMP on CPU. Seen on CPU (torch 2.13, 2 cores):
compiled flex_attention forward works (eager flex is unfused), its backward raises NotImplementedError, so
`attention` falls back to SDPA when a gradient is needed; F.grouped_mm runs in fp32/bf16 (not fp64), but its meta
kernel (what torch.compile traces) accepts bf16 only, hence the custom op; a decode graph of a 2-4 layer model
compiles in 10-25 s and runs 3-5x faster than eager (dispatch-bound at that size). Not run here: CUDA graphs.
"""
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from zaya import tidar_train_layout


def compile_fn(fn, mode=None):
    return torch.compile(fn, dynamic=False, fullgraph=True, mode=mode)

# -----------------------------------------------------------------------------
# attention


def block_mask(dense):
    """A BlockMask equal to a boolean mask [T, S] or [B, T, S] (True = may attend)."""
    if dense.dim() == 2:
        return create_block_mask(lambda b, h, q, k: dense[q, k], None, None, *dense.shape, device=dense.device)
    return create_block_mask(lambda b, h, q, k: dense[b, q, k], dense.shape[0], None, *dense.shape[1:],
                             device=dense.device)


@lru_cache(maxsize=8)
def tidar_train_block_mask(S, K, device="cpu"):
    """The TiDAR training mask over [clean | mask] (zaya.tidar_train_layout), built once per (S, K, device)."""
    return block_mask(tidar_train_layout(S, K, device)[2])


def cache_mask(mask, lengths, capacity):
    """zaya.CCA._attend_cache's mask over ALL `capacity` cache slots (static shape): row b sees its cached prefix
    (slots < lengths[b]) and current token j at slot lengths[b] + j where mask allows. mask [T,T] or [B,T,T] ->
    [B, T, capacity]. Wrapped in block_mask() it is the prefill or decode-step BlockMask with per-row prefixes."""
    B, T = len(lengths), mask.shape[-1]
    rel = torch.arange(capacity, device=lengths.device)[None, :] - lengths[:, None]       # [B, cap]: slot - L_b
    cur = mask.expand(B, T, T).gather(2, rel.clamp(0, T - 1)[:, None, :].expand(B, T, capacity))
    return (rel < 0)[:, None, :] | cur & (rel < T)[:, None, :]


_flex = compile_fn(flex_attention)


def attention(q, k, v, mask, blocks=None):
    """What zaya.CCA computes: softmax attention of q [B,nq,T,hd] over k/v [B,nkv,S,hd] (GQA) under a boolean mask
    [T,S] or [B,T,S]. Given `blocks`, the equal BlockMask, flex_attention runs where it can (no backward on CPU)."""
    cpu_grad = q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if blocks is not None and not cpu_grad:
        return _flex(q, k, v, block_mask=blocks, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None] if mask.dim() == 3 else mask,
                                          enable_gqa=True)

# -----------------------------------------------------------------------------
# MoE experts


@torch.library.custom_op("kernels::grouped_linear", mutates_args=())
def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows offs[e-1]..offs[e]-1 of x [N,k] times w[e].T, w [E,n,k] (F.grouped_mm). A custom op, so torch.compile
    calls it as one opaque kernel in any dtype: the compiler's own grouped_mm accepts only bf16 (torch 2.13)."""
    return F.grouped_mm(x, w.transpose(1, 2), offs=offs)


@torch.library.custom_op("kernels::grouped_outer", mutates_args=())
def grouped_outer(g: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[E, n, k]: g[rows of e].T @ x[rows of e], the weight gradient of grouped_linear."""
    return F.grouped_mm(g.t(), x, offs=offs)


def _grouped_linear_backward(ctx, g):
    x, w, offs = ctx.saved_tensors
    return grouped_linear(g, w.transpose(1, 2), offs), grouped_outer(g, x, offs), None


grouped_linear.register_fake(lambda x, w, offs: x.new_empty(x.shape[0], w.shape[1]))
grouped_outer.register_fake(lambda g, x, offs: g.new_empty(offs.shape[0], g.shape[1], x.shape[1]))
grouped_linear.register_autograd(_grouped_linear_backward,
                                 setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))

_GROUPED_MM = {}     # (device type, dtype) -> whether F.grouped_mm runs there (probed once, eagerly)


def grouped_mm_runs(device, dtype, *widths):
    """Whether F.grouped_mm runs for this device and dtype (probed), with rows of a multiple of 16 bytes."""
    key = (torch.device(device).type, dtype)
    if key not in _GROUPED_MM and not torch.compiler.is_compiling():
        a, b = torch.ones(4, 8, device=device, dtype=dtype), torch.ones(2, 8, 8, device=device, dtype=dtype)
        offs = torch.tensor([1, 4], device=device, dtype=torch.int32)
        try:
            _GROUPED_MM[key] = F.grouped_mm(a, b, offs=offs) is not None
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM[key] = False
    return _GROUPED_MM.get(key, False) and all(w * torch.finfo(dtype).bits // 8 % 16 == 0 for w in widths)


def experts_forward(x, choice, weight, gate_up_proj, down_proj):
    """zaya.Experts.forward without host syncs. x [N,d], choice [N] (E = skip: contributes 0), weight [N,1];
    gate_up_proj [E,2I,d] (rows 0..I-1 gate), down_proj [E,d,I]."""
    E, I = down_proj.shape[0], down_proj.shape[2]
    if x.shape[0] > E and grouped_mm_runs(x.device, x.dtype, x.shape[1], I):
        return experts_grouped(x, choice, weight, gate_up_proj, down_proj)
    return experts_gathered(x, choice, weight, gate_up_proj, down_proj)


def experts_grouped(x, choice, weight, gate_up_proj, down_proj):
    """Tokens sorted by expert, two grouped GEMMs over the sorted rows, back to token order."""
    E = down_proj.shape[0]
    order = choice.argsort()                                           # skips (class E) last
    e_sorted = choice[order].clamp(max=E - 1)                          # skips ride with expert E-1, zeroed below
    offs = torch.searchsorted(e_sorted, torch.arange(E, device=x.device), right=True).to(torch.int32)  # group ends
    gate, up = grouped_linear(x[order], gate_up_proj, offs).chunk(2, -1)
    y = grouped_linear(F.silu(gate) * up, down_proj, offs) * weight[order]
    y = torch.where((choice[order] < E)[:, None], y, 0.0).to(x.dtype)
    return torch.empty_like(x).index_copy(0, order, y)


def experts_gathered(x, choice, weight, gate_up_proj, down_proj):
    """Each token gathers its expert's weights; one bmm. Reads only the chosen experts: the decode path."""
    E = down_proj.shape[0]
    e = choice.clamp(max=E - 1)
    gate, up = torch.bmm(gate_up_proj[e], x[:, :, None])[..., 0].chunk(2, -1)     # [N,2I,d] @ [N,d,1]
    y = torch.bmm(down_proj[e], (F.silu(gate) * up)[:, :, None])[..., 0] * weight
    return torch.where((choice < E)[:, None], y, 0.0).to(x.dtype)


def moe_forward(moe, x, r):
    """zaya.MoE.forward on experts_forward (the load statistic kept too)."""
    (B, T, d), (choice, weight, r) = x.shape, moe.gate(x, r)
    moe.load = F.one_hot(choice.flatten().detach(), moe.experts.gate_up_proj.shape[0] + 1).sum(0)
    y = experts_forward(x.reshape(B * T, d), choice.flatten(), weight.reshape(B * T, 1),
                        moe.experts.gate_up_proj, moe.experts.down_proj)
    return y.view(B, T, d), r

# -----------------------------------------------------------------------------
# small fused ops


@compile_fn
def residual_norm(branch, residual, hs, hb, rs, rb, w, eps):
    """zaya.ResidualScale (h = (branch + hb) * hs + (residual + rb) * rs, fp32) then RMSNorm(w, eps) of h in w's
    dtype. Returns (h, normed). eps: 0-D tensor."""
    h = (branch + hb) * hs + (residual + rb) * rs
    x32 = h.to(w.dtype).float()
    return h, w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(w.dtype)


@compile_fn
def greedy_verify(ar, drafts, valid, mask_id):
    """sample._verify for the lossless sampler at temperature 0. ar [B,K,V] AR logits at d_0..d_{K-1}, drafts
    [B,K-1], valid [B,K-1], mask_id 0-D (never emitted). Returns k [B] accepted drafts and the next token [B]: the
    AR argmax at d_k (the correction, or the bonus when k = K-1)."""
    best = torch.where(torch.arange(ar.shape[-1], device=ar.device) == mask_id, float("-inf"), ar).argmax(-1)
    k = (valid & (drafts == best[:, :-1])).long().cumprod(-1).sum(-1)
    return k, best.gather(1, k[:, None])[:, 0]


@compile_fn
def _cross_entropy_chunk(h, w, targets):
    """Summed CE of one chunk and its gradients w.r.t. h and w (fp32 logits for this chunk only)."""
    logits = F.linear(h, w).float()                                    # as zaya: matmul in the model dtype
    lse = logits.logsumexp(-1, keepdim=True)
    valid = (targets >= 0)[:, None]
    t = targets.clamp(min=0)[:, None]
    loss = torch.where(valid, lse - logits.gather(1, t), 0.0).sum()
    g = torch.where(valid, (logits - lse).exp() - F.one_hot(t[:, 0], w.shape[0]), 0.0).to(h.dtype)  # dloss/dlogits
    return loss, g @ w, (g.t() @ h).float()


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, chunk):
        N = h.shape[0]
        pad = -N % chunk                                               # one chunk shape: one compiled graph
        h, targets = F.pad(h, (0, 0, 0, pad)), F.pad(targets, (0, pad), value=-1)
        loss, gh, gw = h.new_zeros((), dtype=torch.float32), torch.empty_like(h), torch.zeros_like(w, dtype=torch.float)
        for i in range(0, N + pad, chunk):
            l, gh[i:i + chunk], g = _cross_entropy_chunk(h[i:i + chunk], w, targets[i:i + chunk])
            loss, gw = loss + l, gw + g
        n = (targets >= 0).sum()
        ctx.save_for_backward(gh[:N], gw, n)
        ctx.w_dtype = w.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad):
        gh, gw, n = ctx.saved_tensors
        return (gh * (grad / n)).to(gh.dtype), (gw * (grad / n)).to(ctx.w_dtype), None, None


def chunked_cross_entropy(h, weight, targets, chunk=1024):
    """F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-1) without the [N,V] logits: h [N,d],
    weight [V,d] (the tied embedding), targets [N]. Gradients are computed in the forward, so use it for training."""
    return _ChunkedCrossEntropy.apply(h, weight, targets, chunk)

# -----------------------------------------------------------------------------
# the model on the fast paths


def static_attend_cache(attn, cache, k, v, mask):
    """zaya.CCA._attend_cache over the cache's whole capacity when traced: the same writes, keys and mask, but
    static shapes and no host sync (the caller checks the capacity). Eager calls run zaya's own."""
    if not torch.compiler.is_compiling():
        return type(attn)._attend_cache(attn, cache, k, v, mask)
    B, _, T, _ = k.shape
    L = cache.lengths
    rows, slots = torch.arange(B, device=L.device)[:, None], L[:, None] + torch.arange(T, device=L.device)
    ck, cv = cache.k[attn.layer_idx], cache.v[attn.layer_idx]
    ck[rows, :, slots], cv[rows, :, slots] = k.transpose(1, 2).to(ck.dtype), v.transpose(1, 2).to(cv.dtype)
    return ck.to(k.dtype), cv.to(v.dtype), cache_mask(mask, L, ck.shape[2])


def forward_hidden(model, idx, pos, pred, mask, cache=None):
    """zaya.Zaya.forward_hidden on the pieces above, with no host sync (the position check is the caller's)."""
    B, T = idx.shape
    pos, pred = pos.expand(B, T), pred.expand(B, T)
    dt = model.embed_tokens.weight.dtype
    h = ((model.embed_tokens(idx) + model.input_hidden_states_bias) * model.input_hidden_states_scale).float()
    cos, sin = model.rope(pos, dt)
    eps = torch.tensor(model.config.rms_norm_eps, device=h.device)
    x, r = model.layers[0].input_layernorm(h.to(dt)), None
    scales = lambda s: (s.hidden_states_scale, s.hidden_states_bias, s.residual_scale, s.residual_bias)
    for i, layer in enumerate(model.layers):
        nxt = model.layers[i + 1].input_layernorm if i + 1 < len(model.layers) else model.norm
        y = layer.self_attn(x, cos, sin, pred, mask, cache)
        h, x = residual_norm(y, h, *scales(layer.post_attention_residual_scale), layer.post_attention_layernorm.weight,
                             eps)
        y, r = moe_forward(layer.mlp, x, r)
        h, x = residual_norm(y, h, *scales(layer.post_mlp_residual_scale), nxt.weight, eps)
    return x


def enable(model, query_lengths=None, mode=None):
    """Run `model` on the fast paths: forward_hidden becomes one compiled graph per input shape for every cache-free
    call (training: fixed shapes) and for cached calls of `query_lengths` tokens (default 1 and K(1+K): the AR and
    TiDAR decode steps; a TiDAR run with G groups needs K(1+G)); other cached calls (prefill, one per prompt) run
    zaya's eager forward_hidden. mode: None, or "reduce-overhead" (CUDA graphs: the default on CUDA/ROCm) for the
    decode graphs. Undo with disable(model)."""
    K, eager = model.config.block_size, disable(model).forward_hidden
    query_lengths = {1, K * (1 + K)} if query_lengths is None else set(query_lengths)
    w = model.embed_tokens.weight
    train = compile_fn(forward_hidden)
    decode = compile_fn(forward_hidden, mode or ("reduce-overhead" if w.is_cuda else None))
    grouped_mm_runs(w.device, w.dtype)                                # probe before tracing
    for layer in model.layers:
        layer.self_attn._attend_cache = lambda *args, a=layer.self_attn: static_attend_cache(a, *args)

    def fast_forward_hidden(idx, pos, pred, mask, cache=None):
        T = idx.shape[1]
        if cache is None:
            return train(model, idx, pos, pred, mask)
        if T not in query_lengths or torch.is_grad_enabled() or bool(
                (cache.lengths.max() + T > cache.capacity) | (pos.max() >= model.config.max_position_embeddings)):
            return eager(idx, pos, pred, mask, cache)                   # prefill, or zaya's error
        for t in (cache.k, cache.v):                                  # one graph for every cache capacity
            torch._dynamo.mark_dynamic(t, 3)
        if w.is_cuda:                                                 # CUDA graphs write the cache in place
            for t in (cache.k, cache.v, cache.conv, cache.vdel, cache.lengths):
                torch._dynamo.mark_static_address(t, guard=False)
        return decode(model, idx, pos, pred, mask, cache)

    model.forward_hidden = fast_forward_hidden
    return model


def disable(model):
    """Back to the eager reference."""
    model.__dict__.pop("forward_hidden", None)
    for layer in model.layers:
        layer.self_attn.__dict__.pop("_attend_cache", None)
    return model
