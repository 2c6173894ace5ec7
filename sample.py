"""
Decoding (docs/tidar.md sections 3-4): the AR baseline on the static KV cache (zaya.KVCache);
single-forward TiDAR, whose one forward per step verifies K drafts causally AND drafts the next
block for every acceptance length (K mask groups, or a subset `groups`), sharing one KV cache:
accepted tokens' K/V and CCA state are kept without recomputing, the rest truncated; prompt lookup,
the no-training baseline. Samplers: "lossless" = speculative sampling against the model's own AR
distribution (Leviathan et al. 2023; greedy: token for token the greedy AR output); "mix" = Zyphra's
logit mixing, target w * AR + (1 - w) * draft.
"""
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
from cli import check, load_tokenizer, parse_args
from levels import AutoLevels, acceptance_from_histogram, calibrate, gpu_prediction
from zaya import (CheckpointError, KVCache, Zaya, _atomic_write, ar_step_layout, causal_layout,
                  tidar_prefill_layout, tidar_step_layout)

DRAFT_SCALE = 1.5      # lossless TiDAR at T > 0 drafts at T / 1.5 (docs/results.md: draft_scale)

# -----------------------------------------------------------------------------
# statistics and shared pieces
@dataclass
class Stats:
    forwards: int = 0                 # model calls after prefill
    new_tokens: int = 0               # over all rows
    tokens_per_forward: float = 0.0   # tokens per decode step, averaged over rows
    histogram: dict = field(default_factory=dict)   # tokens committed per step -> count (row-steps)
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    groups: tuple = ()                # TiDAR levels drafted each step (auto: the last; () after AR)
    note: str = ""                    # why groups="auto" chose what it chose
    log: list = field(default_factory=list, repr=False)  # record: row 0's (accepted, own token)

    def summary(self):
        hist = " ".join(f"{k}:{v}" for k, v in sorted(self.histogram.items()))
        return (f"{self.new_tokens} tokens in {self.forwards} forwards "
                f"({self.tokens_per_forward:.2f} tokens/forward), {self.seconds:.2f} s, "
                f"{self.tokens_per_s:.1f} tokens/s; committed per step {{{hist}}}")


@dataclass
class Sampling:
    """How tokens are drawn (docs/tidar.md section 4). temperature 0 is greedy; top_k keeps the k
    likeliest; the mask token is never emitted. TiDAR's sampler is "lossless" or "mix" (verify
    against mix_weight * AR + (1 - mix_weight) * draft logits); lossless at temperature > 0 draws
    its drafts at temperature / draft_scale, and verifies them against that same sharpened q."""
    temperature: float = 0.0
    top_k: int | None = None
    mask_id: int | None = None
    generator: torch.Generator | None = None
    sampler: str = "lossless"
    mix_weight: float = 0.5
    draft_scale: float = DRAFT_SCALE

    def __post_init__(self):
        check(self.sampler in ("lossless", "mix"),
              f"sampler must be 'lossless' or 'mix', got {self.sampler!r}")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        check(0.0 <= self.mix_weight <= 1.0, f"mix_weight must be in [0, 1], got {self.mix_weight}")
        check(self.draft_scale > 0, f"draft_scale must be > 0, got {self.draft_scale}")

    @property
    def proposal_scale(self):
        """What draft logits are multiplied by: draft_scale for lossless at T > 0, else 1 (greedy
        takes the argmax; mix mixes the unscaled logits)."""
        sharpen = self.sampler == "lossless" and self.temperature > 0
        return self.draft_scale if sharpen else 1.0

    def process(self, logits):
        """Logits [..., V] with the mask token banned, then temperature and top-k applied."""
        if self.mask_id is not None:
            logits = logits.clone()
            logits[..., self.mask_id] = float("-inf")
        if self.temperature > 0:
            logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits

    def draw(self, logits):
        """Tokens [...] from logits [..., V]: the argmax at temperature 0, else a softmax draw."""
        logits = self.process(logits)
        if self.temperature == 0:
            return logits.argmax(-1)
        flat = logits.softmax(-1).reshape(-1, logits.shape[-1])
        draws = torch.multinomial(flat, 1, generator=self.generator)
        return draws.view(logits.shape[:-1])


def head_logits(model, h):
    """Logits in fp32 even for a bf16 model (near-ties would flip between AR and TiDAR otherwise).
    The fp32 copy of the tied head is made once per weight version (2 GiB at the 8B's V = 262k)."""
    w = model.embed_tokens.weight
    if w.dtype in (torch.float32, torch.float64):
        return F.linear(h.to(w.dtype), w)
    key = (w.data_ptr(), w._version)
    if getattr(model, "_head32", (None,))[0] != key:
        model._head32 = (key, w.detach().float())
    return F.linear(h.float(), model._head32[1])


class _Outputs:
    """New tokens per row in one tensor (no per-token Python work: 30,000 rows stay fast)."""

    def __init__(self, rows, ragged, t0, max_new, K, first):
        self.rows = rows                                # the prompts
        self.ragged = ragged                            # were they given as a list?
        self.t0 = t0                                    # the decoding's start time
        self.buf = first.new_zeros(len(rows), max_new + 2 * K + 1)
        self.buf[:, 0] = first                          # the prefill's token [B]
        self.n = torch.ones_like(first)                 # tokens per row: the prefill's, the steps'
        self.steps = torch.zeros_like(first)            # decode steps per row
        self.hist = first.new_zeros(K + 1)
        self.forwards = 0                               # decode steps (model calls)
        self.max_new = max_new                          # new tokens a row

    def active(self):
        return self.n < self.max_new

    def append(self, tokens, count, active):
        """Row b gets tokens[b, :count[b]] where active[b]. tokens [B, K'], count [B]."""
        j = torch.arange(tokens.shape[1], device=tokens.device)[None]
        idx = self.n[:, None] + j
        keep = (j < count[:, None]) & active[:, None]
        self.buf.scatter_(1, idx, torch.where(keep, tokens, self.buf.gather(1, idx)))
        self.n += torch.where(active, count, 0)
        self.forwards += 1
        self.steps += active.long()
        self.hist += torch.bincount(count[active], minlength=len(self.hist))[:len(self.hist)]

    def finish(self, **fields):
        """prompt + exactly max_new new tokens a row, Stats(**fields)."""
        rates = ((self.n - 1).double() / self.steps.clamp(min=1))[self.steps > 0]
        new = len(self.rows) * self.max_new
        seconds = time.perf_counter() - self.t0
        stats = Stats(forwards=self.forwards, new_tokens=new, seconds=seconds,
                      tokens_per_forward=float(rates.mean()) if len(rates) else 0.0,
                      histogram={i: int(c) for i, c in enumerate(self.hist.tolist()) if c},
                      tokens_per_s=new / max(seconds, 1e-9), **fields)
        buf = self.buf[:, :self.max_new]
        if not self.ragged:
            return torch.cat([torch.stack(self.rows).to(buf.device), buf], 1), stats
        return [torch.cat([r.to(buf.device), b]) for r, b in zip(self.rows, buf)], stats


def _prefill(model, idx, max_new_tokens, K, how, tidar=False):
    """A run of up to K tokens a step, begun: prompts x [B, T] (0-padded right) of lengths P [B], a
    cache with room for the run, one prefill forward h [B, T(+K), d] over x (tidar: [x | K masks],
    which draft block 1), the first token tok [B] in `out`. Returns (out, cache, tok, h, x, P)."""
    t0 = time.perf_counter()
    config = model.config
    dev = model.embed_tokens.weight.device
    ragged = isinstance(idx, (list, tuple))
    rows = [torch.as_tensor(r, dtype=torch.long).flatten() for r in idx] if ragged else list(idx)
    check(max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check(all(len(r) for r in rows), "empty prompt: give at least one token (e.g. the bos token)")
    P = torch.tensor([len(r) for r in rows], device=dev)
    n_ctx = config.max_position_embeddings
    check(int(P.max()) + max_new_tokens <= n_ctx,
          f"prompt ({int(P.max())} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
          f"context of {n_ctx} tokens; shorten the prompt or ask for fewer")
    room = int(P.max()) + max_new_tokens + (K * (2 + K) if tidar else K)
    cache = KVCache(config, len(rows), room, model.embed_tokens.weight.dtype, dev)
    x = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(dev)     # [B, T]
    B, T = x.shape
    if tidar:
        masks = torch.full((B, K), config.mask_token_id, device=dev)
        h = model.forward_hidden(torch.cat([x, masks], 1), *tidar_prefill_layout(P, T, K),
                                 cache=cache)
    else:
        h = model.forward_hidden(x, *causal_layout(T, dev), cache=cache)
    cache.commit(P)
    tok = how.draw(head_logits(model, h[torch.arange(B, device=dev), P - 1]))     # [B]
    out = _Outputs(rows, ragged, t0, max_new_tokens, K, tok)
    return out, cache, tok, h, x, P


# -----------------------------------------------------------------------------
# AR baseline
def ar_step(model, cache, tok, active, how):
    """One AR decode step: tok [B] goes in at each row's cached length, is committed where active,
    and the next token [B] comes out (inactive rows keep tok); how: Sampling."""
    h = model.forward_hidden(tok[:, None], *ar_step_layout(cache.lengths), cache=cache)  # [B, 1, d]
    cache.commit(active.long())
    return torch.where(active, how.draw(head_logits(model, h[:, 0])), tok)


@torch.no_grad()
def generate_ar(model, idx, max_new_tokens, temperature=0.0, top_k=None, generator=None):
    """Plain AR decoding on the static cache. idx: LongTensor [B, T] or a list of 1-D prompts.
    Returns (prompt + exactly max_new_tokens new tokens per row [B, T+N] or a list, Stats)."""
    how = Sampling(temperature, top_k, model.config.mask_token_id, generator)
    out, cache, tok, *_ = _prefill(model, idx, max_new_tokens, 1, how)
    one = torch.ones_like(tok)
    while (active := out.active()).any():
        tok = ar_step(model, cache, tok, active, how)
        out.append(tok[:, None], one, active)
    return out.finish()


# -----------------------------------------------------------------------------
# TiDAR
@dataclass
class Proposal:
    """The drafts d_1..d_{K-1} of the next block, not yet drawn: the logits they are drawn from
    [B, K-1, V] (x Sampling.proposal_scale), which slots hold a draft [B, K-1] (False: none,
    always rejected), and how many slots into its mask group the block starts [B] (AutoLevels)."""
    logits: torch.Tensor
    valid: torch.Tensor
    shift: torch.Tensor


def _verify(ar, drafts, q_logits, valid, how):
    """One verification (docs/tidar.md section 4), vectorised over rows. ar [B, K, V]: AR logits at
    d_0..d_{K-1} (fp32); drafts [B, K-1]: d_1..d_{K-1}; q_logits [B, K-1, V] that proposed them;
    valid [B, K-1]. Returns k [B] (accepted drafts) and the next token [B]: the correction at the
    first rejection, or the bonus from the AR logits after the last draft."""
    B, K, V = ar.shape
    target = ar[:, :-1]
    if how.sampler == "mix":
        w = how.mix_weight
        target = torch.where(valid[..., None], w * target + (1 - w) * q_logits, target)
    target = how.process(target)                                              # [B, K-1, V]
    q_logits = how.process(q_logits)
    if how.temperature == 0:
        ok = valid & (drafts == target.argmax(-1))
    else:
        p = target.softmax(-1)
        q = q_logits.softmax(-1)
        pd, qd = (x.gather(-1, drafts[..., None])[..., 0] for x in (p, q))        # at the drafts
        u = torch.rand(pd.shape, generator=how.generator, device=pd.device)
        ok = valid & (u * qd < pd)                                            # prob min(1, p/q)
    k = ok.long().cumprod(-1).sum(-1)                                         # leading accepted
    rows = torch.arange(B, device=ar.device)
    bonus = how.draw(ar[rows, -1])
    kk = k.clamp(max=K - 2)
    if how.temperature == 0:
        corr = target[rows, kk].argmax(-1)
    else:                                                   # residual max(0, p - q), renormalised
        p = target[rows, kk].softmax(-1)
        q = torch.where(valid[rows, kk, None], q_logits[rows, kk].softmax(-1), 0.0)
        res = (p - q).clamp_min(0)
        res = torch.where(res.sum(-1, keepdim=True) > 0, res, p)
        corr = torch.multinomial(res, 1, generator=how.generator)[:, 0]
    return k, torch.where(k == K - 1, bonus, corr)


@lru_cache(maxsize=64)
def _level_index(K, groups, device):
    """level_of[k]: the closest drafted level <= k; group_of[level]: its index in `groups`."""
    level_of = torch.tensor([max(g for g in groups if g <= k) for k in range(K)], device=device)
    group_of = torch.zeros(K, dtype=torch.long, device=device)
    group_of[list(groups)] = torch.arange(len(groups), device=device)
    return level_of, group_of


def _padded(model, groups, K):
    """The level set as the forward runs it: a compiled model (kernels.enable) has graphs for some
    step sizes only (model.step_sizes), so its set is padded up to the next one with copies of its
    last group, whose drafts are never read. Eager: the set itself."""
    sizes = [n // K - 1 for n in getattr(model, "step_sizes", ()) if n >= K * (1 + len(groups))]
    pad = [groups[-1]] * (min(sizes, default=len(groups)) - len(groups))
    return [*groups, *pad]


def tidar_step(model, cache, d0, proposal, groups, active, how):
    """One TiDAR decode step (docs/tidar.md sections 3-4): draft, one forward, verify, commit, next
    drafts. d0 [B]: each row's first token to commit; proposal: the drafts d_1..d_{K-1} to draw;
    groups: the levels that get a mask group; active [B]: rows still decoding; how: Sampling.
    Returns k [B] (drafts accepted), the tokens committed [B, K] (row b: its first k + 1), and the
    next Proposal (inactive rows keep theirs)."""
    B = d0.shape[0]
    K = proposal.logits.shape[1] + 1
    dev = d0.device
    drafts = torch.where(proposal.valid, how.draw(proposal.logits), 0)      # [B, K-1]

    # one forward over [d_0..d_{K-1} | K masks per level in `groups` (+ pad: kernels.enable)]
    run = _padded(model, groups, K)
    pos, pred, mask = tidar_step_layout(K, run, dev, start=cache.lengths[:, None])
    masks = torch.full((B, K * len(run)), model.config.mask_token_id, device=dev)
    h = model.forward_hidden(torch.cat([d0[:, None], drafts, masks], 1), pos, pred, mask, cache)

    # verify the drafts against the AR logits at d_0..d_{K-1}, keep d_0..d_k: drafts[:k], then nxt
    ar = head_logits(model, h[:, :K])
    k, nxt = _verify(ar, drafts, proposal.logits, proposal.valid, how)
    cache.commit(torch.where(active, k + 1, 0))
    committed = torch.cat([drafts, nxt[:, None]], 1).scatter(1, k[:, None], nxt[:, None])  # [B, K]

    # next drafts: the group at level g = level_of[k]; its slot s predicts position L+g+1+s, and the
    # next block starts at L+k+1, so it reads slots k-g+1.. of that group
    level_of, group_of = _level_index(K, tuple(groups), dev)
    g = level_of[k]
    shift = k - g                                                            # [B]
    src = shift[:, None] + 1 + torch.arange(K - 1, device=dev)[None]         # [B, K-1]
    qidx = K + group_of[g][:, None] * K + src.clamp(max=K - 1)
    rows = torch.arange(B, device=dev)[:, None]
    logits = head_logits(model, h[rows, qidx]) * how.proposal_scale
    nxt_proposal = Proposal(logits=torch.where(active[:, None, None], logits, proposal.logits),
                            valid=torch.where(active[:, None], src < K, proposal.valid),
                            shift=shift)
    return k, committed, nxt_proposal


@torch.no_grad()
def generate_tidar(model, idx, max_new_tokens, sampler="lossless", mix_weight=0.5, temperature=0.0,
                   top_k=None, block_size=None, groups=None, generator=None, record=False,
                   draft_scale=DRAFT_SCALE):
    """Single-forward TiDAR decoding. `groups`: the acceptance levels that get a draft each step
    (default all 0..K-1; 0 is always included); after accepting k drafts, the next drafts come from
    the closest level <= k. groups="auto" (or an AutoLevels) re-chooses the levels on this machine
    as it decodes, and takes plain AR steps while no level set is predicted to beat AR (levels.py).
    Lossless at temperature > 0 draws the drafts at temperature / draft_scale; the verifier uses
    the q they came from, so any draft_scale > 0 is lossless (Leviathan et al. 2023, any proposal).
    record=True: row 0's steps in stats.log (--show). Returns (tokens, Stats) like generate_ar."""
    K = model.config.block_size if block_size is None else block_size
    how = Sampling(temperature, top_k, model.config.mask_token_id, generator, sampler, mix_weight,
                   draft_scale)
    check(K >= 1, f"block_size must be >= 1, got {K}")
    if model.config.mask_token_id is None:
        raise ValueError("this model has no mask_token_id: it was not converted with TiDAR")
    setting = (K, temperature, top_k, sampler, mix_weight, draft_scale)
    auto = AutoLevels.shared(model, setting) if groups == "auto" else None
    auto = groups if isinstance(groups, AutoLevels) else auto
    groups = list(range(K)) if auto or groups is None else sorted(set(groups) | {0})
    check(groups[-1] < K, f"groups must lie in 0..{K - 1}, got {groups}")
    out, cache, d0, h, x, _ = _prefill(model, idx, max_new_tokens, K, how, tidar=True)
    B, T = x.shape
    proposal = Proposal(logits=head_logits(model, h[:, T + 1:]) * how.proposal_scale,  # d_1..
                        valid=torch.ones(B, K - 1, dtype=torch.bool, device=x.device),
                        shift=torch.zeros(B, dtype=torch.long, device=x.device))
    log = [([], int(d0[0]))] if record else []                     # Stats.log
    if auto:
        auto.start(model, B, K, T, cache.capacity)

    while (active := out.active()).any():
        if auto:
            chosen = auto.step()
            if groups is None and chosen is not None:            # back from AR steps: no drafts yet
                proposal.valid.fill_(False)
            groups = chosen
        if groups is None:                                       # a plain AR step (groups="auto")
            d0 = ar_step(model, cache, d0, active, how)
            k = torch.zeros_like(d0)
            committed = d0[:, None]
        else:
            k, committed, nxt_proposal = tidar_step(model, cache, d0, proposal, groups, active, how)
            if auto:
                auto.count(k, proposal.valid, proposal.shift, active)
            proposal = nxt_proposal
            d0 = torch.where(active, committed.gather(1, k[:, None])[:, 0], d0)
        out.append(committed, k + 1, active)
        if record and active[0]:
            log.append((committed[0, :int(k[0])].tolist(), int(committed[0, k[0]])))
    return out.finish(groups=tuple(groups or ()), note=auto.note() if auto else "", log=log)


# -----------------------------------------------------------------------------
# the no-training baseline: prompt-lookup drafting, verified like TiDAR's drafts
def lookup_drafts(ctx, lengths, ngram, D):
    """Prompt-lookup (n-gram) drafts, vectorised over rows: for the longest n <= ngram whose last n
    tokens occurred earlier in the row's context (prompt + output so far), the D tokens that
    followed their latest earlier occurrence. ctx [B, Lmax] (row b: its first lengths[b] tokens)
    -> drafts [B, D] and valid [B, D] (False: no draft in that slot)."""
    B, Lmax = ctx.shape
    dev = ctx.device
    drafts = torch.zeros(B, D, dtype=torch.long, device=dev)
    valid = torch.zeros(B, D, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)[:, None]
    for n in range(min(ngram, Lmax - 1), 0, -1):
        last_n = (lengths[:, None] - n + torch.arange(n, device=dev)).clamp(min=0)
        tail = ctx[rows, last_n]                                       # [B, n]: the row's last n
        windows = ctx.unfold(1, n, 1)                                  # [B, Lmax-n+1, n]
        starts = torch.arange(windows.shape[1], device=dev)[None]      # [1, W]
        hit = (windows == tail[:, None]).all(-1) & (starts + n < lengths[:, None])
        last = torch.where(hit, starts, -1).max(1).values              # latest earlier occurrence
        found = (last >= 0) & ~valid[:, 0]                             # longer n already won
        src = last[:, None] + n + torch.arange(D, device=dev)[None]    # [B, D]
        ok = found[:, None] & (src < lengths[:, None])
        drafts = torch.where(ok, ctx[rows, src.clamp(max=Lmax - 1)], drafts)
        valid |= ok
    return drafts, valid


@torch.no_grad()
def generate_lookup(model, idx, max_new_tokens, temperature=0.0, top_k=None, num_draft=15, ngram=3,
                    generator=None):
    """Prompt-lookup decoding (Saxena 2023), the no-training baseline: each step drafts up to
    num_draft tokens copied from the context (lookup_drafts) and verifies them in one causal forward
    with generate_tidar's lossless rule and KV-cache rollback. The proposal is a point mass, so
    min(1, p/q) = p(draft) and the residual is p without the draft. Returns as generate_ar."""
    how = Sampling(temperature, top_k, model.config.mask_token_id, generator)
    out, cache, tok, _, x, P = _prefill(model, idx, max_new_tokens, num_draft + 1, how)
    ctx = torch.cat([x, torch.zeros_like(out.buf)], 1)              # [B, T + room]: prompt + output

    while (active := out.active()).any():
        ctx.scatter_(1, P[:, None] + torch.arange(out.buf.shape[1], device=x.device), out.buf)
        drafts, valid = lookup_drafts(ctx, P + out.n, ngram, num_draft)
        valid &= active[:, None] & (drafts != model.config.mask_token_id)
        D = int(valid.sum(1).max())                                   # trim to what is drafted
        drafts = drafts[:, :D]
        valid = valid[:, :D]

        pos, pred, mask = causal_layout(D + 1, x.device, start=cache.lengths[:, None])
        h = model.forward_hidden(torch.cat([tok[:, None], drafts], 1), pos, pred, mask, cache)
        ar = head_logits(model, h)                                    # [B, D+1, V]
        if D == 0:
            k = torch.zeros_like(tok)
            nxt = how.draw(ar[:, 0])
        else:
            q = torch.full_like(ar[:, :-1], float("-inf")).scatter(-1, drafts[..., None], 0.0)
            k, nxt = _verify(ar, drafts, q, valid, how)
        cache.commit(torch.where(active, k + 1, 0))
        committed = torch.cat([drafts, nxt[:, None]], 1).scatter(1, k[:, None], nxt[:, None])
        out.append(committed, k + 1, active)
        tok = torch.where(active, nxt, tok)
    return out.finish()


# -----------------------------------------------------------------------------
# the held-out decoding report of `python train.py`: speed on this machine, drafting quality


def _report_runs(weights, seeds, draft_scale):
    """The report's rows: name -> how to decode (report_decode's keywords)."""
    runs = {"AR": dict(kind="ar"), "lossless": dict(record=True)}
    for s in seeds:
        runs[f"lossless T=1 seed {s}"] = dict(temperature=1.0, seed=s, draft_scale=draft_scale)
    for w in weights:
        runs[f"mix w={w}"] = dict(sampler="mix", mix_weight=w)
    runs["prompt lookup"] = dict(kind="lookup")
    return runs


def report_decode(model, prompt, new_tokens, K, kind="tidar", seed=None, temperature=0.0,
                  **tidar_kw):
    """One of the report's runs on one prompt [1, T] -> (tokens [1, T + new_tokens], Stats)."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    if kind == "ar":
        return generate_ar(model, prompt, new_tokens, temperature, generator=gen)
    if kind == "lookup":
        return generate_lookup(model, prompt, new_tokens, temperature, num_draft=K - 1,
                               generator=gen)
    return generate_tidar(model, prompt, new_tokens, temperature=temperature, block_size=K,
                          generator=gen, **tidar_kw)


def ar_log_likelihood(model, toks, prompt_len):
    """The AR head's mean log p(x_t | x_<t) over the tokens after the prompt; toks [1, T]."""
    h = model.forward_hidden(toks, *causal_layout(toks.shape[1], toks.device))
    logp = head_logits(model, h[0, prompt_len - 1:-1]).log_softmax(-1)     # at the new tokens
    new = toks[0, prompt_len:]
    return float(logp.gather(-1, new[:, None]).mean())


def copy_split(prompts, stats):
    """Lossless steps that copy: a step committing 2+ tokens that occur, in order, in the context
    before it (prompt and output; Stats.log of record=True runs). Returns (copy steps, steps,
    tokens the copy steps committed, tokens all steps committed)."""
    copies = []                                     # tokens committed by each copy step
    steps = []                                      # tokens committed by each step
    for p, st in zip(prompts, stats):
        ctx = p.tolist() + [st.log[0][1]]
        for accepted, own in st.log[1:]:
            step = accepted + [own]
            if accepted and any(ctx[j:j + len(step)] == step for j in range(len(ctx))):
                copies.append(len(step))
            ctx += step
            steps.append(len(step))
    return len(copies), len(steps), sum(copies), sum(steps)


def quality_rows(got, K):
    """decode_report's table: per run (got: name -> per prompt (Stats, log-lik, tokens)) tokens per
    forward (mean, sd over prompts), tokens/s and its ratio to the first run's (AR), the AR head's
    mean log-likelihood of the text; then the mean of the T=1 rows over their seeds."""
    rows = []
    for name, res in got.items():
        stats = [st for st, _, _ in res]
        ll = sum(x for _, x, _ in res) / len(res)                  # mean AR log-likelihood
        tpf = torch.tensor([s.tokens_per_forward for s in stats])
        tps = sum(s.new_tokens for s in stats) / sum(s.seconds for s in stats)
        rows.append(dict(name=name, block=K, tokens_per_forward=float(tpf.mean()),
                         sd=float(tpf.std()), tokens_per_s=tps, log_likelihood=ll,
                         speedup=tps / rows[0]["tokens_per_s"] if rows else 1.0))
        print(f"  {name:22s} {tpf.mean():5.2f} +- {tpf.std():4.2f} tokens/forward {tps:7.1f} "
              f"tokens/s {rows[-1]['speedup']:5.2f}x AR, AR log-lik {ll:6.3f}")
    t1 = [r["tokens_per_forward"] for r in rows if r["name"].startswith("lossless T=1")]
    if len(t1) > 1:
        print(f"  lossless T=1 over {len(t1)} seeds: {sum(t1) / len(t1):.2f} tokens/forward")
    return rows


def speed_report(model, prompts, K, new_tokens, decode, runs, rounds=2):
    """What a user gets on this machine, batch 1: `runs` (name -> report_decode's keywords; first
    AR, which the ratios divide by) at T = 0 and T = 1, in tokens/s and bytes/s of text. Each
    prompt runs every setting, in an order rotating per prompt and round, so that a busy spell
    hits all alike; groups="auto"'s calibration runs first, untimed. Returns the rows."""
    generate_tidar(model, prompts[0][None], new_tokens, groups=AutoLevels(), block_size=K)
    print(f"speed on this machine: {len(prompts)} held-out prompts x {rounds} rounds x "
          f"{new_tokens} tokens, batch 1, {torch.get_num_threads()} thread(s), eager")
    rows = []
    for T in (0.0, 1.0):
        got = {name: [0.0, 0, 0, 0.0] for name in runs}       # seconds, tokens, bytes, TPF sum
        for r, (i, p) in ((r, ip) for r in range(rounds) for ip in enumerate(prompts)):
            for j in range(len(runs)):
                name = list(runs)[(i + r + j) % len(runs)]
                toks, st = report_decode(model, p[None], new_tokens, K, seed=i + 100 * r,
                                         temperature=T, **runs[name])
                text = decode(toks[0, len(p):].tolist()).encode()
                new = (st.seconds, st.new_tokens, len(text), st.tokens_per_forward)
                got[name] = [a + b for a, b in zip(got[name], new)]
        ar = got["AR"][1] / got["AR"][0]
        for name, (sec, n, nbytes, tpf) in got.items():
            rows.append(dict(name=f"{name} T={T:g}", tokens_per_s=n / sec, bytes_per_s=nbytes / sec,
                             speedup=n / sec / ar, tokens_per_forward=tpf / rounds / len(prompts)))
            print(f"  T={T:g} {name:20s} {n / sec:7.1f} tokens/s {nbytes / sec:8.1f} bytes/s "
                  f"{n / sec / ar:5.2f}x AR {rows[-1]['tokens_per_forward']:5.2f} tokens/forward")
    return rows


# speed_report's: sample.py's defaults (groups="auto"; eager on a CPU at 128 tokens: compile_pays),
# AR, prompt lookup; the eval pipeline adds AR again (the noise) and every level (docs/tidar.md 7)
SPEED_RUNS = {"AR": dict(kind="ar"), "TiDAR lossless": dict(groups="auto"),
              "prompt lookup": dict(kind="lookup")}
LEVEL_RUNS = {"AR again": dict(kind="ar"), "TiDAR dense": dict(groups=None)}


@torch.no_grad()
def decode_report(model, prompts, out_dir, K=None, weights=(0.5,), seeds=(0,), new_tokens=128,
                  threads=1, draft_scale=DRAFT_SCALE, speed_runs=SPEED_RUNS):
    """The held-out evaluation (docs/acceptance.md, "Measuring TPF honestly"): first the speed a
    user gets (speed_report of speed_runs, on 8 prompts; none: skipped); then each prompt alone
    (batch 1, one thread: a second one mostly adds noise on a shared CPU), block K (default the
    model's), every level drafted. Per row: tokens per forward (mean, sd over prompts), tokens/s,
    the AR head's mean log-likelihood of its text; lossless greedy's steps split into copies and
    the rest; then the GPU prediction (levels.gpu_prediction), a continuation per sampler and
    out_dir/decode.json (out_dir None: none). T=1 drafts at T / draft_scale. threads > 1 (the
    ablation's) for tokens per forward, which threads never change."""
    K = K or model.config.block_size
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, decode = load_tokenizer(model)
        fast = []
        if speed_runs:
            fast = speed_report(model, prompts[:8], K, new_tokens, decode, speed_runs)
        runs = _report_runs(weights, seeds, draft_scale)
        got = {name: [] for name in runs}           # name -> per prompt (Stats, log-lik, tokens)
        for p in prompts:                           # every run on a prompt, then the next prompt
            for name, run_kw in runs.items():
                toks, st = report_decode(model, p[None], new_tokens, K, **run_kw)
                got[name].append((st, ar_log_likelihood(model, toks, len(p)), toks[0, len(p):]))
        print(f"held-out decoding: {len(prompts)} prompts x {new_tokens} tokens, batch 1, block "
              f"{K}, every level drafted, {torch.get_num_threads()} thread(s); tokens/forward: "
              "mean +- sd over prompts")
        rows = quality_rows(got, K)
        lossless = [st for st, _, _ in got["lossless"]]
        copies, steps, copied, total = copy_split(prompts, lossless)
        print(f"  lossless greedy pooled: {total} tokens in {steps} steps, {total / steps:.2f} "
              f"tokens/forward; {copies} steps commit 2+ tokens already in the context, "
              f"{copied / max(copies, 1):.2f} tokens each; the other steps "
              f"{(total - copied) / max(steps - copies, 1):.2f} tokens/forward")
        hist = sum((Counter(st.histogram) for st in lossless), Counter())
        acceptance = acceptance_from_histogram(hist, K)
        gpus = gpu_prediction(acceptance, K)
        first = [next((n for n in runs if n.startswith(s)), None) for s in ("lossless T", "mix")]
        for name in ["AR", "lossless", *filter(None, first)]:      # a continuation per sampler
            print(f"--- {name} continuation of held-out code:\n{decode(got[name][0][2].tolist())}")
        result = dict(ar_tokens_per_s=rows[0]["tokens_per_s"], rows=rows, speed=fast, gpus=gpus,
                      acceptance=acceptance, copies=dict(steps=copies, of=steps, tokens=copied))
        if out_dir:
            _atomic_write(os.path.join(out_dir, "decode.json"),
                          lambda tmp: Path(tmp).write_text(json.dumps(result)))
        return result
    finally:
        torch.set_num_threads(before)


# -----------------------------------------------------------------------------
# command line: python sample.py --init_from=out --prompt="def " --sampler=lossless --compare
DEFAULTS = dict(init_from="out", prompt="def main(", sampler="lossless", mix_weight=0.5,
                temperature=0.0, top_k=0, max_new_tokens=128, block_size=0, groups="auto",
                draft_scale=DRAFT_SCALE, compare=False, show=False, json=False, seed=1337,
                device="cpu", dtype="float32", compile="auto")   # compile: auto | True | False
COMPILE_SECONDS = 150.0   # a first compile (AR and dense graphs) on this 2-core CPU (docs/results)


def compile_pays(model, new_tokens, prompt_len):
    """--compile=auto: on a GPU (CUDA graphs) always; on a CPU when new_tokens eager AR steps (one
    timed: calibrate) outlast COMPILE_SECONDS + the steps compiled, 3x faster (docs/results.md)."""
    if model.embed_tokens.weight.device.type != "cpu":
        return True
    step = calibrate(model, 1, model.config.block_size, prompt_len)[1]
    return new_tokens * step * (1 - 1 / 3) > COMPILE_SECONDS


def parse_groups(text):
    """--groups: "auto", "all" (None: every level) or levels like "0,4,8,12" (a list)."""
    levels = [int(x) for x in text.split(",") if x.strip().isdigit()]
    check(text in ("auto", "all") or levels,
          f"--groups={text}: use auto, all, or levels like 0,4,8,12")
    return {"auto": "auto", "all": None}.get(text, levels)


def show_steps(log, decode, prompt_ids):
    """--show: replays the decoding, accepted drafts green, the sampler's own tokens yellow."""
    green, yellow, dim, reset = "\033[32m", "\033[33m", "\033[2m", "\033[0m"      # ANSI colours
    print(dim + decode(prompt_ids) + reset, end="", flush=True)
    for accepted, own in log:
        print(green + decode(accepted) + yellow + decode([own]) + reset, end="", flush=True)
        time.sleep(0.05)
    print()


def main(argv):
    args = {**DEFAULTS, **parse_args(argv, DEFAULTS)}
    torch.manual_seed(args["seed"])
    check(args["dtype"] in ("float32", "bfloat16", "float64"),
          f"--dtype must be float32, bfloat16 or float64, got {args['dtype']!r}")
    dtype = getattr(torch, args["dtype"])
    model = Zaya.from_pretrained(args["init_from"], dtype=dtype, device=args["device"]).eval()
    encode, decode = load_tokenizer(model)
    ids = encode(args["prompt"]) or [model.config.bos_token_id or 0]
    idx = torch.tensor([ids], device=args["device"])
    kw = dict(temperature=args["temperature"], top_k=args["top_k"] or None)
    groups = parse_groups(args["groups"])
    n = args["max_new_tokens"]
    when = args["compile"]                              # auto | True | False
    check(when in ("auto", "True", "False"), f"--compile={when}: use auto, True or False")
    compiled = when == "True" or when == "auto" and compile_pays(model, n, idx.shape[1])
    if compiled:
        kernels.enable(model)                           # on-disk cache: a 2nd process is faster
    if args["sampler"] == "ar":
        toks, st = generate_ar(model, idx, n, **kw)
    else:
        toks, st = generate_tidar(model, idx, n, args["sampler"], args["mix_weight"], groups=groups,
                                 block_size=args["block_size"] or None, record=args["show"],
                                 draft_scale=args["draft_scale"], **kw)
    if args["show"] and st.log:
        show_steps(st.log, decode, ids)
    else:
        print(decode(toks[0].tolist()))
    levels = f"; levels {list(st.groups)}" if st.groups else ""
    print(f"---\n{args['sampler']}{' (compiled)' * compiled}: {st.summary()}{levels}"
          + (f"\n{st.note}" if st.note else ""))
    result = dict(sampler=args["sampler"], compiled=compiled, forwards=st.forwards,
                  new_tokens=st.new_tokens, tokens_per_forward=round(st.tokens_per_forward, 4),
                  tokens_per_s=round(st.tokens_per_s, 2))
    if args["compare"] and args["sampler"] != "ar":
        _, ar = generate_ar(model, idx, n, **kw)
        result["ar_tokens_per_s"] = round(ar.tokens_per_s, 2)
        result["speedup"] = round(st.tokens_per_s / ar.tokens_per_s, 3)
        print(f"ar: {ar.summary()}\nspeedup vs AR in this run: {result['speedup']:.2f}x")
    if args["json"]:
        print(json.dumps(result))


def cli_main(argv):
    """main() with bad input as one line on stderr and a non-zero exit code, no traceback."""
    try:
        main(argv)
        return 0
    except (ValueError, CheckpointError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
