"""
Per-machine proposal levels: groups="auto" in sample.generate_tidar (docs/tidar.md, "Proposal
levels").

A TiDAR step over n = K + K*m query tokens (K drafts, m mask groups) costs t(n); an AR step costs
t(1). Where t is flat (a GPU at batch 1: memory-bound) every level pays; where it grows (a CPU, a
GPU at large batch, an MoE whose bigger queries touch more experts) only a few levels pay, or none.
Zyphra hand-tunes the set per accelerator ([0, 4, 7, 11] on MI300X); here choose_levels picks it
from measurements, the per-slot acceptance (level_rate: tokens per step) and the latency curve t(n)
(calibrate), and AutoLevels does so online, as it decodes.
"""
import statistics
import time
import weakref

import torch

from zaya import KVCache, ZayaConfig, causal_layout, tidar_step_layout


def level_rate(levels, c, K):
    """Expected tokens committed per step when drafting `levels`. c[s] = P(the draft from group slot
    s is accepted | every draft before it was), s = 1..K-1. A block whose first draft is slot s0
    holds K - s0 drafts; accepting j of them commits j + 1 tokens, and the next block comes from
    level g = max(l <= j), so it starts at slot j - g + 1. The stationary distribution of this
    Markov chain over s0 weights the tokens per step."""
    P = [[0.0] * (K + 1) for _ in range(K + 1)]      # plain lists: this runs during decoding
    E = [0.0] * (K + 1)
    level_of = [max(l for l in levels if l <= j) for j in range(K)]
    for s0 in range(1, K + 1):
        reach = 1.0                                   # P(the first j drafts accepted)
        for j in range(K - s0 + 1):
            p_j = reach * ((1 - c[s0 + j]) if j < K - s0 else 1.0)
            E[s0] += p_j * (j + 1)
            P[s0][j - level_of[j] + 1] += p_j
            reach *= c[s0 + j] if j < K - s0 else 0.0
    P, E = torch.tensor(P, dtype=torch.float64), torch.tensor(E, dtype=torch.float64)
    # lazy: same stationary distribution, aperiodic; its K-cycle modes decay as cos(pi/K)^n
    lazy = (torch.eye(K + 1, dtype=torch.float64) + P) / 2
    # from slot 1 (row 1 of lazy^steps); {0} alone: K, 1, K, 1, ...
    return float((torch.linalg.matrix_power(lazy, 1024 + 8 * K * K) @ E)[1])


def constant_acceptance(K, tpf):
    """The constant per-slot acceptance c whose dense set commits `tpf` tokens per step (bisection:
    level_rate grows with c)."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if level_rate(list(range(K)), [mid] * (K + 1), K) < tpf else (lo, mid)
    return [lo] * (K + 1)


def acceptance_from_histogram(hist, K):
    """Per-slot acceptance c[s] = P(draft s accepted | drafts 1..s-1 were) from a DENSE run's
    histogram of tokens committed per step (dense: every block starts at slot 1, so committing
    j + 1 means drafts 1..j accepted)."""
    # reach[j]: steps with >= j drafts accepted
    reach = [sum(v for n, v in hist.items() if n - 1 >= j) for j in range(K)]
    return [0.0] + [reach[j] / reach[j - 1] if reach[j - 1] else 0.0 for j in range(1, K)] + [0.0]


def choose_levels(c, seconds, K):
    """Greedy forward selection from {0}: add the level that raises the predicted tokens/s most,
    until none does; the dense set is tried too. seconds(n): one step over n query tokens. Returns
    (levels, predicted tokens/s)."""
    def rate(levels):
        return level_rate(levels, c, K) / seconds(K + K * len(levels))
    levels = [0]
    best = rate(levels)
    while trials := [(rate(sorted(levels + [l])), l) for l in range(1, K) if l not in levels]:
        r, l = max(trials)
        if r <= best:
            break
        best = r
        levels = sorted(levels + [l])
    dense = rate(list(range(K)))
    return (list(range(K)), dense) if dense > best else (levels, best)


class AutoLevels:
    """groups="auto" (docs/tidar.md section 7): before each step, plain AR (None) or the level set
    choose_levels predicts fastest. seconds(n), a step of n query tokens: the median of this reply's
    steps of that size, else t(n) (calibrate) + the median time TiDAR steps took beyond t(n). Slot
    acceptance, shrunk to the pooled rate p: c[s] = (accepted[s] + 2 p) / (tried[s] + 2). First a
    TiDAR probe of `probe` steps, then a choice every `every` steps (fewer while TiDAR wins:
    choosing spends at most `explore` of the time); TiDAR must beat AR by `margin`. A probe that AR
    beats lost its time - its tokens x an AR step's; the next waits the losses of this row of losing
    probes / (explore x AR step) AR steps: probing spends at most `explore` (2%) of the time, 2
    explore / (n + 1) after n probes in a row (section 7.5), over every reply. An instance as
    `groups` sets these, the latency curve or the clock; "auto": one per model, setting."""

    def __init__(self, latency=None, clock=time.perf_counter, probe=4, every=8, explore=0.02,
                 margin=0.05):
        self.given = latency
        self.clock = clock
        self.probe = probe
        self.every = every
        self.explore = explore
        self.margin = margin

    _shared = weakref.WeakKeyDictionary()     # model -> {(weights' version, setting): instance}

    @classmethod
    def shared(cls, model, setting):
        """groups="auto"'s: one per model, weights and sampling setting, kept for the process like
        the latency curves, so that each reply resumes where the last one stood."""
        key = (model.embed_tokens.weight._version, *setting)
        return cls._shared.setdefault(model, {}).setdefault(key, cls())

    def start(self, model, B, K, prefix, cap=0):
        self.latency = calibrate(model, B, K, prefix, cap) if self.given is None else self.given
        self.K = K
        self.last = None                   # (n, start time) of the step under way
        self.times = {}                    # n -> this reply's step times
        self.extra = []                    # TiDAR steps' time beyond t(n)
        self.used = {}                     # this reply's steps per level set ("AR": plain AR)
        self.why = ""                      # the last choice's reason
        self.lost = 0.0                    # seconds this reply's probes lost to AR
        self.never = K / self.latency[2 * K] < 1 / self.latency[1]   # any set's best case vs AR
        if getattr(self, "kept", None) == (K, self.never):           # the next reply: go on
            return
        self.kept = (K, self.never)
        self.tries, self.succ = torch.zeros(K + 1), torch.zeros(K + 1)
        self.stretch = [0.0, 0.0]          # TiDAR steps since the last AR: seconds, tokens/row
        self.losing = 0.0                  # seconds lost by the probes since TiDAR last won
        self.groups = None if self.never else choose_levels([0.5] * (K + 1), self.seconds, K)[0]
        self.left = float("inf") if self.never else self.probe

    def seconds(self, n):
        if self.times.get(n):
            return statistics.median(self.times[n][-16:])
        t = self.latency[n]
        return t + (statistics.median(self.extra[-16:]) if self.extra and n > 1 else 0.0)

    def step(self):
        """Time the previous step, re-choose when due; this step's levels (None: plain AR step)."""
        now = self.clock()
        if self.last is not None:
            self.times.setdefault(self.last[0], []).append(now - self.last[1])
            if self.last[0] > 1:
                self.extra.append(now - self.last[1] - self.latency[self.last[0]])
                self.stretch[0] += now - self.last[1]
        if self.left <= 0:
            pooled = (self.succ.sum() + 1) / (self.tries.sum() + 2)
            c = ((self.succ + 2 * pooled) / (self.tries + 2)).tolist()
            levels, rate = choose_levels(c, self.seconds, self.K)
            ar = 1 / self.seconds(1)
            if rate >= ar * (1 + self.margin):  # TiDAR wins: keep going, re-choose soon
                took = (self.clock() - now) / self.seconds(self.K * (1 + len(levels)))  # in steps
                self.groups = levels
                self.left = max(self.every, took / self.explore)
                self.losing = 0.0
            elif self.groups is None:           # AR's turn is over: probe TiDAR again
                self.groups = levels
                self.left = self.probe
            else:                               # AR wins: AR until the probe budget allows another
                lost = max(0.0, self.stretch[0] - self.stretch[1] / ar)
                self.losing = self.losing + lost if lost else 0.0   # one that lost nothing: over
                self.groups = None
                self.left = max(self.every, self.losing * ar / self.explore)
                self.lost += lost
                self.stretch = [0.0, 0.0]
            self.why = f"levels {levels} predict {rate:.0f} tokens/s vs AR {ar:.0f}"
        self.left -= 1
        key = "AR" if self.groups is None else str(self.groups)
        self.used[key] = self.used.get(key, 0) + 1
        n = 1 if self.groups is None else self.K * (1 + len(self.groups))
        self.latency[n]                  # a lazy calibration happens here, not in the timing
        self.last = (n, self.clock())
        return self.groups

    def count(self, k, valid, shift, active):
        """Per group slot, from one verification: drafts tried (all before accepted), accepted."""
        i = torch.arange(valid.shape[1], device=k.device)[None]
        tried = active[:, None] & valid & (i <= k[:, None])
        slot = (shift[:, None] + 1 + i).clamp(max=self.K)
        self.stretch[1] += float((k + 1)[active].float().mean())        # tokens per row this step
        self.tries += torch.bincount(slot[tried], minlength=self.K + 1).cpu()
        self.succ += torch.bincount(slot[tried & (i < k[:, None])], minlength=self.K + 1).cpu()

    def note(self):
        spent = getattr(self.latency, "seconds", 0.0)   # a LatencyCurve counts its own cost
        cal = f" (latency calibration: {spent:.2f} s, once)" if spent else ""
        if self.never:
            return "auto: AR is faster here even if every draft is accepted; decoding AR" + cal
        steps = ", ".join(f"{k} {v}" for k, v in self.used.items())
        return (f"auto: steps {{{steps}}}; probes lost {self.lost * 1e3:.1f} ms to AR; "
                f"last choice: {self.why or 'the first probe'}" + cal)


def median_seconds(fn, reps=5, device="cpu"):
    """Median wall seconds of fn() over reps runs after one warm-up run (compiles happen); on CUDA
    each run ends synced, so the next starts clean."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    fn(), sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(), sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


class LatencyCurve(dict):
    """t(n): median seconds of one forward over n query tokens after a cached prefix (n = 1: an AR
    step; K + K*m: a TiDAR step with m groups; any other n: a causal forward), measured the first
    time n is asked for: 1 warm-up + `reps` runs. The drafts are random tokens: an MoE's cost
    depends on how tokens spread over experts, and all-zero inputs (one expert) are too cheap."""

    def __init__(self, model, B, K, prefix, reps=5, capacity=0):
        super().__init__()
        self.model = weakref.ref(model)
        self.capacity = capacity
        self.B = B
        self.K = K
        self.prefix = prefix
        self.reps = reps
        self.seconds = 0.0                               # what measuring has cost so far

    @torch.no_grad()
    def __missing__(self, n):
        t_start = time.perf_counter()
        model = self.model()
        K = self.K
        P = self.prefix
        config = model.config
        w = model.embed_tokens.weight
        S = torch.full((self.B, 1), P, device=w.device)  # start [B, 1] as decoding's: one graph
        step = n % K == 0 and n > K                      # K + K*m, m >= 1: drafts and mask groups
        up = min((s for s in getattr(model, "step_sizes", ()) if s >= n), default=n)
        if step and up != n:                             # compiled: runs padded up (tidar_step)
            return self.setdefault(n, self[up])
        if step:
            pos, pred, mask = tidar_step_layout(K, range(n // K - 1), w.device, start=S)
        else:
            pos, pred, mask = causal_layout(n, w.device, start=S)
        gen = torch.Generator().manual_seed(n)
        x = torch.randint(0, min(256, config.vocab_size), (self.B, n), generator=gen).to(w.device)
        x[:, K:] = config.mask_token_id if step else x[:, K:]
        cache = KVCache(config, self.B, max(P + n, self.capacity), dtype=w.dtype, device=w.device)
        cache.lengths.fill_(P)                           # a forward writes K/V, keeps the lengths
        run = lambda: model.forward_hidden(x, pos, pred, mask, cache)
        self[n] = median_seconds(run, self.reps, w.device)
        self.seconds += time.perf_counter() - t_start   # the calibration's cost so far
        return self[n]


_CURVES = {}


def calibrate(model, B, K, prefix, cap=0):
    """The latency curve per machine, model, dtype, batch, K, prefix, cache capacity (compiled, all
    of it is read), both in 64-token buckets, and path; shared in this process, measured lazily."""
    w = model.embed_tokens.weight
    key = (w.device, w.dtype, repr(model.config), B, K, prefix // 64, cap // 64,
           hasattr(model, "step_sizes"))
    curve = _CURVES.setdefault(key, LatencyCurve(model, B, K, prefix, capacity=cap))
    curve.model = weakref.ref(model)                       # measure with a live model of this shape
    return curve


# -----------------------------------------------------------------------------
# the step-cost model: what a decode step costs on a GPU, from the shape alone (bench.py --roofline)
# (bytes/s, dense bf16 FLOP/s): docs/tidar.md section 6; the H100 (not there): the SXM's specs
GPUS = dict(H100=(3.35e12, 989e12), H200=(4.8e12, 989e12), MI300X=(5.3e12, 1307e12))
# docs/tidar.md section 6: the roofline bound it quotes (4k context, 7.5 tokens per step) and
# Zyphra's measured speedups (their vLLM fork): {(what, device): {batch: speedup}}
REFERENCE = {("docs/tidar.md's bound", "H100"): {1: "1.2", 4: "2.3", 16: "3.8", 64: "2.7-3"},
             ("Zyphra measured", "H100"): {1: "2.60", 8: "1.80", 16: "1.66", 64: "1.13"},
             ("Zyphra measured", "MI300X"): {1: "1.16", 8: "0.84-0.98", 64: "0.84-0.98"}}


def step_cost(c, w=2):
    """cost(B, n, ctx) = (bytes read, FLOPs) of a decode step of B rows of n query tokens (AR: 1; a
    level set: K + K * len(levels)) after ctx cached tokens, w-byte (bf16) weights and KV cache,
    from the config alone (docs/tidar.md section 6). Bytes: each weight once per step, of the
    experts only the E(1 - (1 - 1/E)^N) per layer that N = B * n tokens are expected to wake under
    uniform top-1 routing (the skip class, kept unchosen by its bias -1, taken as never chosen: an
    upper bound), the whole tied head, the query tokens' embedding rows; per row the KV cache as
    KVCache holds it and CCA's fp32 state. FLOPs per query token: 2 x (those weights + one expert a
    layer + the head: a logit row each) + per layer 4 nq hd (ctx + n), attention over the cache and
    the step's own keys, masked but dense (zaya's KVCache.mask and update). Activations are taken to
    stay on chip."""
    L, E, d, R = c.num_hidden_layers, c.num_experts, c.hidden_size, c.router_hidden_size
    nq, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    C = (nq + nkv) * hd                                     # CCA's [q|k] conv channels
    attn = 2 * d * C + 2 * C * (hd + 2) + nkv               # q, k, v, o; 2 convs (+ bias); temp
    router = R * (d + 2 * R + E + 5)                        # down, norm, fc1, fc2, out (+ biases)
    # + per layer 2 norms and 2 residual scales; EDA scales after layer 0; input scale, bias, norm
    once = L * (attn + router + 10 * d) + (L - 1) * R + 3 * d
    expert = 3 * c.moe_intermediate_size * d                # gate, up, down
    head = c.vocab_size * d                                 # V x d
    kv = L * 2 * nkv * hd * w                               # bytes of a token's K and V
    state = L * 4 * (2 * C + nkv * hd // 2)                 # bytes of a row's CCA state (fp32)

    def cost(B, n, ctx):
        N = B * n                                           # query tokens in the step
        weights = once + L * E * (1 - (1 - 1 / E) ** N) * expert + head   # experts woken
        return (w * (weights + N * d) + B * (ctx * kv + state),
                N * (2 * (once + L * expert + head) + 4 * L * nq * hd * (ctx + n)))
    return cost


def gpu_prediction(acc, K, batches=(1, 16, 64), ctx=4096):
    """The speedup of lossless TiDAR over AR that the step-cost model predicts for ZAYA1-8B's shape
    in bf16 on each of GPUS at batch B, ctx cached tokens: the level set choose_levels picks for
    the per-slot acceptance `acc` (measured: acceptance_from_histogram), as tokens/s per row over
    AR's 1 / t(1) (below 1, auto would decode AR); printed beside Zyphra's figures (REFERENCE)."""
    cost = step_cost(ZayaConfig.from_name("zaya1-8b", block_size=K))
    dense = level_rate(list(range(K)), acc, K)
    print(f"  predicted on GPUs (docs/tidar.md section 6: the 8B's shape, bf16, {ctx} cached "
          f"tokens, this acceptance: dense {dense:.2f} tokens/step), lossless vs AR at batch B:")
    table = {}
    for gpu in GPUS:
        for B in batches:
            def t(n):                           # the roofline time: bytes or FLOPs bound
                nbytes, flops = cost(B, n, ctx)
                return max(nbytes / GPUS[gpu][0], flops / GPUS[gpu][1])
            table[gpu, B] = choose_levels(acc, t, K)[1] * t(1)
        print(f"    {gpu:7s}" + "".join(f"  B={B}: {table[gpu, B]:4.2f}x" for B in batches))
    for (what, gpu), row in REFERENCE.items():
        print(f"    {what}, {gpu}: " + ", ".join(f"B={B} {x}x" for B, x in row.items()))
    return {f"{gpu} B={B}": x for (gpu, B), x in table.items()}
