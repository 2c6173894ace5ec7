"""
Fast paths for zaya.py: torch.compile of the model's own eager forward (gpt-fast style), and an
expert dispatch that the compiler can trace. The eager code in zaya.py is the reference;
test_zaya.py checks each path here against it; a program that never calls `enable` never runs this.

What is compiled, and why:
- `enable(model)` compiles zaya's own `Zaya.forward_hidden` (no second copy of the forward): one
  graph per input shape for cache-free calls (training) and for cached calls of the decode query
  lengths: 1 (AR) and K(1+m) for m = 1, 2, 4, ..., K mask groups, which sample.tidar_step pads any
  level set up to (copies of its last group); prefills run eager. Compiled, cache attention reads
  a static cache under its mask, its capacity the one dynamic dimension (no recompile per run): on
  CUDA/ROCm the run's cache, replayed as CUDA graphs (mode="reduce-overhead"); on a CPU, where a
  host sync is free, views up to the 64-slot bucket holding the step (a TiDAR run's cache is sized
  for dense steps), never all of it (a contiguous view would compile a second graph).
- Experts: zaya.Experts loops over experts after a host sync (.tolist()), which the compiler cannot
  trace. Traced, it calls `experts_forward` instead (zaya.Experts.dispatch): tokens sorted by expert
  and two grouped GEMMs (F.grouped_mm as a custom op, so the compiler takes it in every dtype); for
  a few tokens (N <= E), or where grouped_mm does not run, each token gathers its expert's weights
  and one bmm runs: static shapes, reading only the chosen experts.
Backends: Triton on CUDA/ROCm (CUDA graphs: not run here), C++/OpenMP on CPU, where (torch 2.13)
grouped_mm runs in fp32/bf16, not fp64, but its meta kernel takes bf16 only (hence the custom op).
"""
import copy

import torch
import torch.nn.functional as F

import zaya


# -----------------------------------------------------------------------------
# MoE experts
@torch.library.custom_op("kernels::grouped_linear", mutates_args=())
def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows offs[e-1]..offs[e]-1 of x [N, k] times w[e].T, w [E, n, k] (F.grouped_mm). A custom op,
    so torch.compile calls it as one opaque kernel in any dtype (its own takes only bf16)."""
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
grouped_linear.register_autograd(_grouped_linear_backward, setup_context=lambda ctx, inputs, **_:
                                 ctx.save_for_backward(*inputs))

_GROUPED_MM = {}  # (device type, dtype) -> whether F.grouped_mm runs there (probed once, eagerly)


def grouped_mm_runs(device, dtype, *widths):
    """Whether F.grouped_mm runs for this device and dtype (probed), rows a multiple of 16 bytes."""
    key = (torch.device(device).type, dtype)
    if key not in _GROUPED_MM and not torch.compiler.is_compiling():
        a, b = (torch.ones(shape, device=device, dtype=dtype) for shape in ((4, 8), (2, 8, 8)))
        offs = torch.tensor([1, 4], device=device, dtype=torch.int32)
        try:
            _GROUPED_MM[key] = F.grouped_mm(a, b, offs=offs) is not None
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM[key] = False
    return _GROUPED_MM.get(key, False) and all(w * dtype.itemsize % 16 == 0 for w in widths)


def experts_forward(x, choice, weight, gate_up_proj, down_proj):
    """zaya.Experts.forward without host syncs (grouped GEMMs, or a gather for a few tokens: above).
    x [N, d], choice [N] (E = skip: contributes 0), weight [N, 1]; gate_up_proj [E, 2I, d] (rows
    0..I-1 gate), down_proj [E, d, I]."""
    E, I = down_proj.shape[0], down_proj.shape[2]
    if x.shape[0] <= E or not grouped_mm_runs(x.device, x.dtype, x.shape[1], I):
        e = choice.clamp(max=E - 1)             # each token gathers its expert's weights, one bmm
        # [N, 2I, d] @ [N, d, 1]
        gate, up = torch.bmm(gate_up_proj[e], x[:, :, None])[..., 0].chunk(2, -1)
        y = torch.bmm(down_proj[e], (F.silu(gate) * up)[:, :, None])[..., 0] * weight
        return torch.where((choice < E)[:, None], y, 0.0).to(x.dtype)
    order = choice.argsort()                    # sorted by expert (skips, class E, last): grouped
    e_sorted = choice[order].clamp(max=E - 1)                        # skips ride with E-1, zeroed
    experts = torch.arange(E, device=x.device)
    offs = torch.searchsorted(e_sorted, experts, right=True).to(torch.int32)   # group ends [E]
    gate, up = grouped_linear(x[order], gate_up_proj, offs).chunk(2, -1)       # [N, I] each
    y = grouped_linear(F.silu(gate) * up, down_proj, offs) * weight[order]     # [N, d]
    y = torch.where((choice[order] < E)[:, None], y, 0.0).to(x.dtype)
    return torch.empty_like(x).index_copy(0, order, y)


# -----------------------------------------------------------------------------
# the model's own forward, compiled
def enable(model, query_lengths=None):
    """Run `model` compiled (what and why: above). query_lengths: the cached calls' lengths that get
    a graph, default 1 (AR) and the TiDAR steps K(1+m) with m = 1, 2, 4, ..., K mask groups, which
    sample.tidar_step pads other sets up to (model.step_sizes). Undo with disable(model)."""
    K = model.config.block_size
    eager = disable(model).forward_hidden
    buckets = [2**i for i in range(K.bit_length()) if 2**i < K] + [K]
    query_lengths = set(query_lengths or [1, *(K * (1 + m) for m in buckets)])
    w = model.embed_tokens.weight
    zaya.Experts.dispatch = experts_forward                         # used only while tracing
    grouped_mm_runs(w.device, w.dtype)                              # probe before tracing
    model.step_sizes = sorted(n for n in query_lengths if n > K and n % K == 0)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # graphs
    train = torch.compile(zaya.Zaya.forward_hidden, dynamic=False, fullgraph=True)
    decode = torch.compile(zaya.Zaya.forward_hidden, dynamic=False, fullgraph=True,
                           mode="reduce-overhead" if w.is_cuda else None)   # CUDA graphs

    def forward_hidden(idx, pos, pred, mask, cache=None):
        T = idx.shape[1]
        if cache is None:
            return train(model, idx, pos, pred, mask)
        S = int(cache.lengths.max()) + T                            # slots in use after this step
        cpu = not w.is_cuda
        if (T not in query_lengths or torch.is_grad_enabled() or S > cache.capacity - cpu
                or int(pos.max()) >= model.config.max_position_embeddings):
            return eager(idx, pos, pred, mask, cache)               # a prefill, or zaya's own error
        if cpu:     # no device to sync with: views up to the step's 64-slot bucket, never the whole
            S = min(cache.capacity - 1, (S + 63) // 64 * 64)        # (so one graph)
            cache = copy.copy(cache)
            cache.k, cache.v = cache.k[:, :, :, :S], cache.v[:, :, :, :S]
        for t in (cache.k, cache.v):                                # one graph for every capacity
            torch._dynamo.mark_dynamic(t, 3)
        if w.is_cuda:                                               # CUDA graphs write in place
            for t in (cache.k, cache.v, cache.conv, cache.vdel, cache.lengths):
                torch._dynamo.mark_static_address(t, guard=False)
        return decode(model, idx, pos, pred, mask, cache)

    model.forward_hidden = forward_hidden


def disable(model):
    """Back to the eager reference."""
    model.__dict__.pop("forward_hidden", None)
    model.__dict__.pop("step_sizes", None)
    return model
