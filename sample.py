"""
Decoding: the AR baseline and single-forward TiDAR with its two samplers (../shared/docs/TIDAR.md sections 3-4).

generate_ar    one token per forward on the static KV cache (zaya.KVCache).
generate_tidar one forward per step verifies K drafts causally AND drafts the next block for every acceptance
               length (K mask groups, or a subset `groups`), sharing one KV cache: accepted tokens' K/V and CCA
               state are committed without recomputation, the rest is truncated.
Samplers: "lossless" = speculative sampling against the model's own AR distribution (Leviathan et al. 2023;
greedy: token-for-token the greedy AR output); "mix" = Zyphra's logit mixing, target w*AR + (1-w)*draft.
"""
import functools
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from levels import AutoLevels
from zaya import CheckpointError, KVCache, Zaya, causal_layout, tidar_step_layout

# -----------------------------------------------------------------------------
# statistics and shared pieces


@dataclass
class Stats:
    forwards: int = 0                 # model calls after prefill
    new_tokens: int = 0               # over all rows
    tokens_per_forward: float = 0.0   # tokens produced by decode steps / decode steps, averaged over rows
    histogram: dict = field(default_factory=dict)   # tokens committed per step -> count (row-steps)
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    groups: tuple = ()                # TiDAR levels drafted each step (auto: the last ones; () after AR steps)
    note: str = ""                    # why groups="auto" chose what it chose
    cache: object = field(default=None, repr=False)   # the final KVCache, for inspection
    log: list = field(default_factory=list, repr=False)  # with record=True: row 0's (accepted drafts, own token)

    def summary(self):
        hist = " ".join(f"{k}:{v}" for k, v in sorted(self.histogram.items()))
        return (f"{self.new_tokens} tokens in {self.forwards} forwards ({self.tokens_per_forward:.2f} tokens/forward), "
                f"{self.seconds:.2f} s, {self.tokens_per_s:.1f} tokens/s; committed per step {{{hist}}}")


def _prepare(model, idx, max_new_tokens, extra):
    """Prompts as a padded [B,Tmax] tensor + lengths, and an empty cache with room for the run."""
    ragged = isinstance(idx, (list, tuple))
    rows = [torch.as_tensor(r, dtype=torch.long).flatten() for r in idx] if ragged else list(idx)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(r) == 0 for r in rows):
        raise ValueError("empty prompt: give at least one token (e.g. the bos token)")
    P = torch.tensor([len(r) for r in rows])
    limit = model.config.max_position_embeddings
    if int(P.max()) + max_new_tokens > limit:
        raise ValueError(f"prompt ({int(P.max())} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {limit} tokens; shorten the prompt or ask for fewer tokens")
    dev = model.embed_tokens.weight.device
    x = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)        # [B, Tmax], right-padded with 0
    cache = KVCache(model.config, len(rows), int(P.max()) + max_new_tokens + extra,
                    dtype=model.embed_tokens.weight.dtype, device=dev)
    return ragged, rows, x.to(dev), P.to(dev), cache


def _logits(model, h):
    """Verify/sample logits in fp32 even for a bf16 model (near-ties would flip between AR and TiDAR otherwise).
    The fp32 copy of the tied head is made once per weight version, not every step (2 GiB at the 8B's V = 262k)."""
    w = model.embed_tokens.weight
    if w.dtype == torch.float32 or w.dtype == torch.float64:
        return F.linear(h.to(w.dtype), w)
    key = (w.data_ptr(), w._version)
    if getattr(model, "_head32", (None,))[0] != key:
        model._head32 = (key, w.detach().float())
    return F.linear(h.float(), model._head32[1])


def _process(logits, temperature, top_k, mask_id):
    """Temperature and top-k; the mask token is never emitted."""
    if mask_id is not None:
        logits = logits.clone()
        logits[..., mask_id] = float("-inf")
    if temperature > 0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def _sample(logits, temperature, generator=None):
    """argmax at temperature 0, else a draw from softmax(logits) (logits already processed). [..., V] -> [...]"""
    if temperature == 0:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])


class _Outputs:
    """New tokens per row in one tensor (no per-token Python work, so a 30,000-row batch stays fast)."""

    def __init__(self, B, max_new, K, device, stop_at_eos, eos):
        self.buf = torch.zeros(B, max_new + 2 * K + 1, dtype=torch.long, device=device)
        self.n = torch.zeros(B, dtype=torch.long, device=device)        # tokens written per row
        self.steps, self.made = torch.zeros_like(self.n), torch.zeros_like(self.n)
        self.hist = torch.zeros(K + 1, dtype=torch.long, device=device)
        self.max_new, self.eos = max_new, (eos if stop_at_eos else None)

    def active(self):
        done = self.n >= self.max_new
        if self.eos is not None:
            written = torch.arange(self.buf.shape[1], device=self.n.device)[None] < self.n[:, None]
            done |= ((self.buf == self.eos) & written).any(1)
        return ~done

    def append(self, tokens, count, active, decode=True):
        """Row b gets tokens[b, :count[b]] where active[b]. tokens [B,K'], count [B]."""
        j = torch.arange(tokens.shape[1], device=tokens.device)[None]
        idx = self.n[:, None] + j
        keep = (j < count[:, None]) & active[:, None]
        self.buf.scatter_(1, idx, torch.where(keep, tokens, self.buf.gather(1, idx)))
        self.n += torch.where(active, count, 0)
        if decode:
            self.steps += active.long()
            self.made += torch.where(active, count, 0)
            self.hist += torch.bincount(count[active], minlength=len(self.hist))[:len(self.hist)]

    def finish(self, ragged, rows, stats, t0, cache):
        """prompt + exactly max_new new tokens per row (fewer after an eos when asked to stop there); Stats."""
        stats.cache = cache
        n = self.n.clamp(max=self.max_new)
        if self.eos is not None:
            hit = (self.buf[:, :self.max_new] == self.eos).float().cumsum(1)
            n = torch.minimum(n, (hit < 1).sum(1) + 1)
        stats.histogram = {i: int(c) for i, c in enumerate(self.hist.tolist()) if c}
        stats.new_tokens = int(n.sum())
        rates = (self.made.double() / self.steps.clamp(min=1))[self.steps > 0]
        stats.tokens_per_forward = float(rates.mean()) if len(rates) else 0.0
        stats.seconds = time.perf_counter() - t0
        stats.tokens_per_s = stats.new_tokens / max(stats.seconds, 1e-9)
        if not ragged and bool((n == self.max_new).all()):
            return torch.cat([torch.stack(rows).to(self.buf.device), self.buf[:, :self.max_new]], 1), stats
        return [torch.cat([r.to(self.buf.device), self.buf[b, :int(n[b])]]) for b, r in enumerate(rows)], stats

# -----------------------------------------------------------------------------
# AR baseline


@torch.no_grad()
def generate_ar(model, idx, max_new_tokens, temperature=0.0, top_k=None, stop_at_eos=False, generator=None):
    """Plain autoregressive decoding on the static cache. idx: LongTensor [B,T] or a list of 1-D prompts.
    Returns (prompt + exactly max_new_tokens new tokens per row [B,T+N] or a list, Stats)."""
    _check_args(temperature, top_k)
    t0 = time.perf_counter()
    c = model.config
    ragged, rows, x, P, cache = _prepare(model, idx, max_new_tokens, 1)
    B, dev = len(rows), x.device
    pos, pred, mask = causal_layout(x.shape[1], dev)
    h = model.forward_hidden(x, pos, pred, mask, cache)
    cache.commit(P)
    last = _process(_logits(model, h[torch.arange(B, device=dev), P - 1]), temperature, top_k, c.mask_token_id)
    tok = _sample(last, temperature, generator)                        # [B]
    out = _Outputs(B, max_new_tokens, 1, dev, stop_at_eos, c.eos_token_id)
    out.append(tok[:, None], torch.ones_like(tok), torch.ones_like(tok, dtype=torch.bool), decode=False)
    stats, one = Stats(), torch.ones(1, 1, dtype=torch.bool, device=dev)
    while (active := out.active()).any():
        h = model.forward_hidden(tok[:, None], cache.lengths[:, None], torch.ones_like(tok)[:, None], one, cache)
        cache.commit(active.long())
        tok = _sample(_process(_logits(model, h[:, 0]), temperature, top_k, c.mask_token_id), temperature, generator)
        stats.forwards += 1
        out.append(tok[:, None], torch.ones_like(tok), active)
    return out.finish(ragged, rows, stats, t0, cache)


def _check_args(temperature, top_k, mix_weight=0.5, block_size=1, sampler="lossless"):
    for bad, msg in ((sampler not in ("lossless", "mix"), f"sampler must be 'lossless' or 'mix', got {sampler!r}"),
                     (temperature < 0, f"temperature must be >= 0, got {temperature}"),
                     (top_k is not None and top_k < 1, f"top_k must be >= 1, got {top_k}"),
                     (not 0.0 <= mix_weight <= 1.0, f"mix_weight must be in [0, 1], got {mix_weight}"),
                     (block_size < 1, f"block_size must be >= 1, got {block_size}")):
        if bad:
            raise ValueError(msg)

# -----------------------------------------------------------------------------
# TiDAR


def _verify(ar, drafts, draft_logits, valid, sampler, w, temperature, top_k, mask_id, generator):
    """One verification (TIDAR.md section 4), vectorised over rows.
    ar [B,K,V]: AR logits at d_0..d_{K-1} (fp32); drafts [B,K-1]: d_1..d_{K-1}; draft_logits [B,K-1,V] that
    proposed them; valid [B,K-1] (False: no draft, always rejected). Returns k [B] (accepted drafts) and the
    next token [B] (the correction at the first rejection, or the bonus from the AR logits)."""
    B, K, V = ar.shape
    target = ar[:, :-1]
    if sampler == "mix":
        target = torch.where(valid[..., None], w * target + (1 - w) * draft_logits, target)
    target = _process(target, temperature, top_k, mask_id)                    # [B,K-1,V]
    q_logits = _process(draft_logits, temperature, top_k, mask_id)
    if temperature == 0:
        ok = valid & (drafts == target.argmax(-1))
    else:
        p, q = target.softmax(-1), q_logits.softmax(-1)
        pd, qd = p.gather(-1, drafts[..., None])[..., 0], q.gather(-1, drafts[..., None])[..., 0]
        u = torch.rand(pd.shape, generator=generator, device=pd.device)
        ok = valid & (u * qd < pd)                                           # accept with prob min(1, p/q)
    k = ok.long().cumprod(-1).sum(-1)                                        # leading accepted drafts
    rows = torch.arange(B, device=ar.device)
    bonus = _sample(_process(ar[rows, -1], temperature, top_k, mask_id), temperature, generator)
    kk = k.clamp(max=K - 2)
    tk = target[rows, kk]
    if temperature == 0:
        corr = tk.argmax(-1)
    else:                                                                    # residual max(0, p - q), renormalised
        p, q = tk.softmax(-1), torch.where(valid[rows, kk, None], q_logits[rows, kk].softmax(-1), 0.0)
        res = (p - q).clamp_min(0)
        res = torch.where(res.sum(-1, keepdim=True) > 0, res, p)
        corr = torch.multinomial(res, 1, generator=generator)[:, 0]
    return k, torch.where(k == K - 1, bonus, corr)


@functools.lru_cache(maxsize=64)
def _step_layout(K, groups, device):
    """tidar_step_layout + level_of[k] (the closest level <= k) + group_of[level] (its index in groups), built once."""
    level_of = torch.tensor([max(g for g in groups if g <= k) for k in range(K)], device=device)
    group_of = torch.zeros(K, dtype=torch.long, device=device)
    group_of[list(groups)] = torch.arange(len(groups), device=device)
    return (*tidar_step_layout(K, groups, device), level_of, group_of)


@torch.no_grad()
def generate_tidar(model, idx, max_new_tokens, sampler="lossless", mix_weight=0.5, temperature=0.0, top_k=None,
                   block_size=None, groups=None, stop_at_eos=False, generator=None, record=False):
    """Single-forward TiDAR decoding. `groups`: the acceptance levels that get a draft each step (default all
    0..K-1; 0 is always included); after accepting k drafts, the next drafts come from the closest level <= k.
    groups="auto" (or an AutoLevels) re-chooses the levels on this machine as it decodes, and takes plain AR steps
    while no level set is predicted to beat AR (levels.py). record=True keeps row 0's steps in stats.log for --show.
    Returns (tokens, Stats) like generate_ar."""
    K = model.config.block_size if block_size is None else block_size
    _check_args(temperature, top_k, mix_weight, K, sampler)
    c = model.config
    if c.mask_token_id is None:
        raise ValueError("this model has no mask_token_id: it was not converted with TiDAR")
    auto = AutoLevels() if groups == "auto" else groups if isinstance(groups, AutoLevels) else None
    groups = list(range(K)) if auto or groups is None else sorted(set(groups) | {0})
    if groups[-1] >= K:
        raise ValueError(f"groups must lie in 0..{K - 1}, got {groups}")
    t0 = time.perf_counter()
    ragged, rows, x, P, cache = _prepare(model, idx, max_new_tokens, K * (2 + K))
    B, dev, Tp = len(rows), x.device, x.shape[1]
    # prefill: [prompt (causal) | K masks at positions P..P+K-1, chain starting at the last prompt token]
    t = torch.arange(Tp + K, device=dev)
    pos = torch.where(t < Tp, t, P[:, None] + t - Tp)                        # [B, Tp+K]
    pred = torch.where(t < Tp, t + 1, torch.where(t == Tp, P[:, None] + 1, t + 1))
    qm, km = (t >= Tp)[:, None], (t >= Tp)[None, :]
    mask = ((~qm & ~km & (t[None, :] <= t[:, None]))[None]
            | (qm & ~km)[None] & (t[None, None, :] < P[:, None, None])
            | (qm & km)[None])
    xin = torch.cat([x, torch.full((B, K), c.mask_token_id, device=dev)], 1)
    h = model.forward_hidden(xin, pos, pred, mask, cache)
    cache.commit(P)
    rows_i, one = torch.arange(B, device=dev), torch.ones(B, dtype=torch.long, device=dev)
    d0 = _sample(_process(_logits(model, h[rows_i, P - 1]), temperature, top_k, c.mask_token_id), temperature, generator)
    dlog = _logits(model, h[:, Tp + 1:])                                     # [B,K-1,V] drafts for d_1..d_{K-1}
    valid, shift = torch.ones(B, K - 1, dtype=torch.bool, device=dev), torch.zeros_like(one)
    out = _Outputs(B, max_new_tokens, K, dev, stop_at_eos, c.eos_token_id)
    out.append(d0[:, None], one, one.bool(), decode=False)
    stats = Stats(log=[([], int(d0[0]))] if record else [])
    if auto:
        auto.start(model, B, K, Tp)
    while (active := out.active()).any():
        if auto:
            new = auto.step()
            if groups is None and new is not None:                           # back from AR steps: no drafts yet
                valid.fill_(False)
            groups = new
        if groups is None:                                                   # a plain AR step (groups="auto")
            h = model.forward_hidden(d0[:, None], cache.lengths[:, None], one[:, None], one[:1, None].bool(), cache)
            cache.commit(torch.where(active, 1, 0))
            stats.forwards += 1
            d0 = torch.where(active, _sample(_process(_logits(model, h[:, 0]), temperature, top_k, c.mask_token_id),
                                             temperature, generator), d0)
            out.append(d0[:, None], one, active)
            if record and active[0]:
                stats.log.append(([], int(d0[0])))
            continue
        # one decode step = [d_0..d_{K-1} | K masks per level in `groups`]
        offs, spred, smask, level_of, group_of = _step_layout(K, tuple(groups), dev)
        drafts = _sample(_process(dlog, temperature, top_k, c.mask_token_id), temperature, generator)
        drafts = torch.where(valid, drafts, 0)
        q_in = torch.cat([d0[:, None], drafts, torch.full((B, K * len(groups)), c.mask_token_id, device=dev)], 1)
        h = model.forward_hidden(q_in, cache.lengths[:, None] + offs, spred, smask, cache)
        stats.forwards += 1
        ar = _logits(model, h[:, :K])                                        # [B,K,V]
        k, nxt = _verify(ar, drafts, dlog, valid, sampler, mix_weight, temperature, top_k, c.mask_token_id, generator)
        cache.commit(torch.where(active, k + 1, 0))                         # keep d_0..d_k
        if auto:
            auto.count(k, valid, shift, active)
        # next drafts: the group at level g = level_of[k]; its slot s predicts position L+g+1+s, we need L+k+1+s'
        g = level_of[k]
        gi = group_of[g]                                                      # g's index in `groups`
        shift = k - g                                                         # slots already behind us
        src = shift[:, None] + 1 + torch.arange(K - 1, device=dev)[None]      # [B,K-1] slot index in the group
        qidx = K + gi[:, None] * K + src.clamp(max=K - 1)
        dlog = torch.where(active[:, None, None], _logits(model, h[rows_i[:, None], qidx]), dlog)  # [B,K-1,V]
        valid = torch.where(active[:, None], src < K, valid)
        accepted = torch.cat([drafts, nxt[:, None]], 1)                     # row b: drafts[:k] then nxt
        accepted.scatter_(1, k[:, None], nxt[:, None])
        out.append(accepted, k + 1, active)
        if record and active[0]:
            stats.log.append((drafts[0, :int(k[0])].tolist(), int(nxt[0])))
        d0 = torch.where(active, nxt, d0)
    stats.groups, stats.note = tuple(groups or ()), auto.note() if auto else ""
    return out.finish(ragged, rows, stats, t0, cache)

# -----------------------------------------------------------------------------
# command line: python sample.py --init_from=out --prompt="def " --sampler=lossless --compare


DEFAULTS = dict(init_from="out", prompt="def main(", sampler="lossless", mix_weight=0.5, temperature=0.0, top_k=0,
                max_new_tokens=128, block_size=0, groups="auto", compare=False, show=False, json=False, seed=1337,
                device="cpu", dtype="float32", bench=False)


def load_tokenizer(model):
    """(encode, decode) for a loaded checkpoint: our runs name their tiktoken tokenizer; HF dirs ship tokenizer.json."""
    meta = getattr(model, "checkpoint_meta", {})
    if "hf_dir" in meta:
        path = os.path.join(meta["hf_dir"], "tokenizer.json")
        if not os.path.exists(path):
            raise ValueError(f"{meta['hf_dir']} has no tokenizer.json; pass token ids another way")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("decoding this checkpoint needs the `tokenizers` package: pip install tokenizers") from None
        tok = Tokenizer.from_file(path)
        return (lambda s: tok.encode(s).ids), (lambda ids: tok.decode(ids))
    from train import get_tokenizer
    enc, _ = get_tokenizer(meta.get("tokenizer", "bytes"))                # train.UsageError is a ValueError
    return (lambda s: enc.encode(s)), (lambda ids: enc.decode([i for i in ids if i < enc.n_vocab]))


def show_steps(decode, prompt_ids, log):
    """Replay a decode step by step: accepted drafts green, the sampler's own token (correction/bonus) yellow."""
    green, yellow, dim, reset = "\033[32m", "\033[33m", "\033[2m", "\033[0m"
    print(dim + decode(prompt_ids) + reset, end="", flush=True)
    for accepted, own in log:
        print(green + decode(accepted) + yellow + decode([own]) + reset, end="", flush=True)
        time.sleep(0.05)
    print()


def main(argv):
    if any(a in ("--bench", "--bench=True") for a in argv):              # python sample.py --bench [bench.py flags]
        from bench import main as bench
        return bench([a for a in argv if not a.startswith("--bench")])
    from train import parse_args
    args = {**DEFAULTS, **parse_args(argv, DEFAULTS)}
    torch.manual_seed(args["seed"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}.get(args["dtype"])
    if dtype is None:
        raise ValueError(f"--dtype must be float32, bfloat16 or float64, got {args['dtype']!r}")
    model = Zaya.from_pretrained(args["init_from"], dtype=dtype, device=args["device"]).eval()
    encode, decode = load_tokenizer(model)
    ids = encode(args["prompt"]) or [model.config.bos_token_id or 0]
    idx = torch.tensor([ids], device=args["device"])
    kw = dict(temperature=args["temperature"], top_k=args["top_k"] or None, stop_at_eos=False)
    g = args["groups"]                                                 # auto | all | 0,4,8,12
    groups = g if g == "auto" else None if g == "all" else [int(x) for x in g.split(",") if x.strip().isdigit()]
    if groups == []:
        raise ValueError(f"--groups={g}: use auto, all, or levels like 0,4,8,12")
    if args["sampler"] == "ar":
        out, st = generate_ar(model, idx, args["max_new_tokens"], **kw)
    else:
        out, st = generate_tidar(model, idx, args["max_new_tokens"], sampler=args["sampler"], mix_weight=args["mix_weight"],
                                 block_size=args["block_size"] or None, groups=groups, record=args["show"], **kw)
    if args["show"] and st.log:
        show_steps(decode, ids, st.log)
    else:
        print(decode(out[0].tolist()))
    print("---")
    print(f"{args['sampler']}: {st.summary()}" + (f"; levels {list(st.groups)}" if st.groups else "")
          + (f"\n{st.note}" if st.note else ""))
    result = dict(sampler=args["sampler"], forwards=st.forwards, new_tokens=st.new_tokens,
                  tokens_per_forward=round(st.tokens_per_forward, 4), tokens_per_s=round(st.tokens_per_s, 2))
    if args["compare"] and args["sampler"] != "ar":
        _, ar = generate_ar(model, idx, args["max_new_tokens"], **kw)
        result["ar_tokens_per_s"], result["speedup"] = round(ar.tokens_per_s, 2), round(st.tokens_per_s / ar.tokens_per_s, 3)
        print(f"ar: {ar.summary()}")
        print(f"speedup vs AR in this run: {result['speedup']:.2f}x")
    if args["json"]:
        print(json.dumps(result))
    return result


def cli(argv):
    """main() with bad input reported as one line on stderr and a non-zero exit code, no traceback."""
    try:
        main(argv)
        return 0
    except (ValueError, CheckpointError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
