"""
Benchmarks, one line per measurement, every ratio of numbers measured side by side in this run:
- every row on one model's weights (--init_from's, else a random --config one): ours vs
  transformers' ZayaForCausalLM, AR decode tok/s (batch 1, greedy; eager and compiled:
  kernels.enable) and training tok/s (our AR and TiDAR steps vs its AR step; a step: forward,
  loss, backward, AdamW at lr 0); TiDAR (lossless, mix 0.5, auto; compiled also the fastest fixed
  level set) vs our AR (tok/s, tokens per forward: TPF); forward latency vs query tokens T;
- --gpu8b: that curve (beside the H200 roofline's) and AR decode on an 8B-shaped random bf16 model
  (CUDA; --gpu8b_config tiny --device cpu tests it), the TiDAR speedup implied at --tpf,
  TPF * t(1) / t(K(1+K)), and level sets' predicted tok/s per batch; --roofline: step times and
  speedups on GPUs, from the shape alone. AR vs level sets vs auto: train.py --pipeline=eval;
- --draft_scales: lossless T=1 tokens per forward of --init_from's model on held-out prompts, per
  draft scale (drafts at T / draft_scale) and seed.
Random weights' tokens mean nothing: their speeds and TPF are only this code's.
"""
import argparse
import itertools
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

import kernels
from levels import (AutoLevels, LatencyCurve, calibrate, choose_levels, constant_acceptance,
                    level_rate, median_seconds)
from sample import HAND_SETS, generate_ar, generate_tidar
from train import DEFAULTS, TrainLoss, heldout_prompts
from zaya import Zaya, ZayaConfig

FLAGS = [  # (flag, type, default, help); type bool: a switch; a list default: nargs="*"
    ("init_from", str, None, "a checkpoint for the TiDAR/AR part (default: a random model)"),
    ("config", str, "small", "random model's preset"), ("threads", int, 0, "CPUs (0: torch's)"),
    ("device", str, "cuda" if torch.cuda.is_available() else "cpu", None),
    ("compile", lambda s: s.lower() in ("1", "true", "yes"), True, None),
    ("prompt_len", int, 32, None), ("new_tokens", int, 128, None), ("reps", int, 3, None),
    ("prefix", int, 256, None), ("train_batch", int, 4, None), ("train_len", int, 256, None),
    ("gpu8b", bool, False, "only the 8B-shaped latency curve, decode and levels (needs CUDA)"),
    ("gpu8b_config", str, "zaya1-8b", "preset for --gpu8b, --roofline ('tiny': a CPU test)"),
    ("query_tokens", int, [], "--gpu8b: more T"), ("tpf", float, 3.0, "TPF of the implied speedup"),
    ("acceptance", str, "out/decode.json", "--gpu8b, --roofline: per-slot acceptance measured"),
    ("batches", int, [1, 16], "--gpu8b: batch sizes for the level sets"),
    ("roofline", bool, False, "only predicted step times and speedups on GPUs (no weights)"),
    ("draft_scales", float, [], "only lossless T=1 TPF at these draft scales (--init_from)"),
    ("seeds", int, [0, 1, 2, 3], "--draft_scales: sampling seeds"),
    ("prompts", int, 32, "--draft_scales: held-out prompts"),
    ("data", str, "stdlib", "--draft_scales: the corpus whose held-out files give the prompts")]


def timed(fn, a):
    """Median seconds of fn() over a.reps runs after a warm-up, on a.device."""
    return median_seconds(fn, a.reps, a.device)


def say(what, value, unit, extra=""):
    print(f"{what:<58} {value:>10.2f} {unit}{'  ' + extra if extra else ''}", flush=True)


def tokens(config, shape, device, seed=1):
    """Random ids < min(256, vocab), the same for a seed: prompts [1, n], training rows [B, S+1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(256, config.vocab_size), shape, generator=g).to(device)


def paths(a, model):
    """Yields "eager", then (--compile) "compiled" with kernels.enable(model) on; off afterwards."""
    yield "eager"
    if a.compile:
        kernels.enable(model)                             # graphs: T = 1, TiDAR steps, training
        yield "compiled"
    kernels.disable(model)


def bench_vs_reference(a, model, device):
    """Our AR decode (eager, compiled) and training steps vs transformers' on the same weights."""
    from transformers import ZayaForCausalLM
    with tempfile.TemporaryDirectory() as d:                  # from_pretrained: in eval mode
        model.save_pretrained(d)
        ref = ZayaForCausalLM.from_pretrained(d, dtype=model.embed_tokens.weight.dtype).to(device)
    x = tokens(model.config, (1, a.prompt_len), device)
    n = a.new_tokens
    gen = lambda: ref.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # no_grad
    theirs = gen()
    t_ref = timed(gen, a)
    say("AR decode, transformers ZayaForCausalLM.generate", n / t_ref, "tok/s")
    ours = generate_ar(model, x, n)[0]
    t = {}                                                      # path -> seconds
    for tag in paths(a, model):                 # eager: vs the reference's tokens; compiled: ours
        t[tag] = timed(lambda: generate_ar(model, x, n), a)
        vs = "" if tag == "eager" else f"{t['eager'] / t[tag]:.2f}x eager, "
        same = torch.equal(ours, theirs if tag == "eager" else generate_ar(model, x, n)[0])
        say(f"AR decode, ours {tag} ({'generate_ar' if tag == 'eager' else 'kernels.enable'})",
            n / t[tag], "tok/s", f"{t_ref / t[tag]:.2f}x the reference, {vs}same tokens: {same}")
    # training tok/s: one step (forward + loss + backward + AdamW) on B rows of S + 1 tokens
    B, S = a.train_batch, a.train_len
    w = tokens(model.config, (B, S + 1), device, seed=2)

    def ref_loss():
        return ref(input_ids=w[:, :S], labels=w[:, :S]).loss

    def our_loss(mode):          # train.py's own loss (the paper's settings), one full-logit chunk
        s = SimpleNamespace(**{**DEFAULTS, "mode": mode, "block_size": model.config.block_size,
                               "loss_chunk": 0})
        return TrainLoss(model, s)(w)[0]

    model.train()
    ref.train()
    r_ref = B * S / train_step_seconds(ref, ref_loss, a)
    say(f"train AR step, transformers (B={B}, S={S})", r_ref, "tok/s")
    for tag in paths(a, model):                 # tok/s: B * S real tokens per step
        r_ar = B * S / train_step_seconds(model, lambda: our_loss("ar"), a)
        r_td = B * S / train_step_seconds(model, lambda: our_loss("tidar"), a)
        say(f"train AR step, ours {tag}", r_ar, "tok/s", f"{r_ar / r_ref:.2f}x the reference")
        say(f"train TiDAR step, ours {tag} (2S tokens per row)", r_td, "tok/s",
            f"{r_td / r_ar:.2f}x our AR step")
    model.eval()
    ref.eval()


def train_step_seconds(net, loss_fn, a):
    """Seconds of one training step of net on loss_fn(): backward and AdamW at lr 0 (the weights
    stay, so every row runs on the same model)."""
    opt = torch.optim.AdamW(net.parameters(), lr=0.0)

    def step():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, a)


def latency_curve(a, model, tag, Ts, note=lambda T: ""):
    """{T: median seconds of a T-token forward (a verify/draft pass) after a.prefix cached tokens}:
    levels.LatencyCurve at batch 1, a.reps runs; note(T) ends each line."""
    out = LatencyCurve(model, 1, model.config.block_size, a.prefix, a.reps)
    for T in Ts:
        say(f"forward latency {tag}, prefix {a.prefix}, T={T}", out[T] * 1e3, "ms",
            f"{out[T] / out[Ts[0]]:.2f}x T=1{note(T)}")
    return out


def gpu8b(a):
    device = torch.device(a.device)
    name = a.gpu8b_config
    config = ZayaConfig.from_name(name)
    with torch.device(device):
        model = Zaya(config).to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    K = config.block_size
    Ts = sorted({1, K, K * (1 + K)} | set(a.query_tokens or []))
    say(f"{name}: parameters ({device.type}, {model.embed_tokens.weight.dtype})",
        model.num_params() / 1e6, "M", f"{model.num_params(active=True) / 1e6:.1f} M active")
    kernels.enable(model, query_lengths=Ts)
    cost = step_cost(config)

    def note(T):                                            # the roofline's prediction
        h200 = step_seconds(cost, *GPUS["H200"], 1, T, a.prefix)
        return f"; H200 roofline {h200 * 1e3:.3g} ms (bf16)"
    tag = "compiled"
    try:
        curve = latency_curve(a, model, tag, Ts, note)
    except Exception as e:                                  # say why, then measure the eager path
        print(f"compiled path failed: {type(e).__name__}: {str(e)[:300]}; eager instead")
        tag = "eager"
        curve = latency_curve(a, kernels.disable(model), tag, Ts, note)
    x = tokens(config, (1, a.prompt_len), device)
    n = a.new_tokens
    t = timed(lambda: generate_ar(model, x, n), a)
    say(f"{name}: AR decode, {tag}, batch 1", n / t, "tok/s")
    say(f"{name}: implied TiDAR speedup at TPF {a.tpf}",
        a.tpf * curve[1] / curve[K * (1 + K)], "x", f"= TPF * t(1) / t({K * (1 + K)})")
    kernels.disable(model)
    level_predictions(model, K, load_acceptance(a.acceptance, K, a.tpf), a.batches, a.prefix)


def load_acceptance(path, K, tpf):
    """Per-slot acceptance from a reproduction's decode.json (its dense held-out run), else a
    constant one whose dense tokens per forward is `tpf` (random weights accept nothing)."""
    acc = path and os.path.exists(path) and json.loads(Path(path).read_text()).get("acceptance")
    if acc and len(acc) == K + 1:
        dense = level_rate(list(range(K)), acc, K)
        print(f"acceptance per slot from {path}: dense TPF {dense:.2f}")
        return acc
    acc = constant_acceptance(K, tpf)
    print(f"acceptance per slot: constant {acc[0]:.3f} (dense TPF {tpf}); no decode.json at {path}")
    return acc


def level_sets(K):
    """The level sets benchmarks compare: "dense" (all K levels) and each of sample.HAND_SETS."""
    return {"dense": list(range(K)), **{str(g): g for g in HAND_SETS}}


def rates(t, acc, K, B):
    """Tokens/s at batch B of AR and each of level_sets(K), from per-slot acceptance acc and t(n),
    the seconds of a step over n query tokens per row (AR: 1; a level set: K + K * len(levels))."""
    r = {k: B * level_rate(g, acc, K) / t(K + K * len(g)) for k, g in level_sets(K).items()}
    return {"AR": B / t(1), **r}


def level_predictions(model, K, acc, batches, prefix):
    """Tokens/s predicted from this machine's latency curve t(n) (eager, levels.calibrate) and
    acceptance acc per batch size: AR, dense, the best hand-picked set, auto's (or AR: its
    margin)."""
    for B in batches:
        t = calibrate(model, B, K, prefix)
        rate = rates(t.__getitem__, acc, K, B)
        best = max((str(g) for g in HAND_SETS), key=rate.get)
        levels, r = choose_levels(acc, t.__getitem__, K)
        auto = levels if B * r >= rate["AR"] * (1 + AutoLevels().margin) else "AR"
        rate["auto"] = rate.get(str(auto), B * r)
        for name in ("AR", "dense", best, "auto"):
            suffix = " (best fixed)" if name == best else f" = {auto}" if name == "auto" else ""
            say(f"batch {B}: {name}" + suffix, rate[name], "tok/s",
                f"{rate[name] / rate['AR']:.2f}x AR, predicted from t(n) and acceptance")


# (bytes/s, dense bf16 FLOP/s): docs/tidar.md section 6; the H100 (not there): the H100 SXM's
# public ones
GPUS = dict(H100=(3.35e12, 989e12), H200=(4.8e12, 989e12), MI300X=(5.3e12, 1307e12),
            MI355X=(8e12, 2500e12))
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


def step_seconds(cost, bandwidth, peak, B, n, ctx):
    """max(bytes / bandwidth, FLOPs / peak): the roofline time of step_cost's step (B, n, ctx)."""
    nbytes, flops = cost(B, n, ctx)
    return max(nbytes / bandwidth, flops / peak)


def roofline(a):
    """--roofline: step times t(step) = max(bytes / bandwidth, FLOPs / peak) (step_cost) and TiDAR
    speedups, B x TPF / t(step) over AR's B / t(AR step), predicted on GPUS from --gpu8b_config's
    shape alone (docs/tidar.md section 6); TPF: level_rate of the fastest of level_sets at the
    measured acceptance (load_acceptance) and the anchors' (constant: dense TPF 8.25, TiDAR 8B's,
    docs/tidar.md section 5)."""
    config = ZayaConfig.from_name(a.gpu8b_config)
    K = config.block_size
    cost = step_cost(config)
    sets = level_sets(K)
    batches = (1, 4, 16, 64)
    acc = dict(measured=load_acceptance(a.acceptance, K, a.tpf),
               anchor=constant_acceptance(K, 8.25), tpf7_5=constant_acceptance(K, 7.5))
    print(f"roofline, {a.gpu8b_config}, bf16; at the measured, then the anchor acceptance: best "
          f"set, its step ms and speedup\n{'device ctx B':<15}{'AR ms':>9}{'dense ms':>9}"
          + "  {:>13}{:>8}{:>7}".format("best set", "its ms", "x AR") * 2)
    sp = {}                                        # (gpu, ctx, B, acceptance): best, dense speedup
    for (gpu, roof), ctx, B in itertools.product(GPUS.items(), (4096, 32768), batches):
        def t(n):
            return step_seconds(cost, *roof, B, n, ctx)
        row = f"{gpu:<7}{ctx // 1024:>3}k{B:>4}{t(1) * 1e3:9.2f}{t(K * (1 + K)) * 1e3:9.2f}"
        for name, slot_acc in acc.items():
            r = rates(t, slot_acc, K, B)
            best = max(sets, key=r.get)
            sp[gpu, ctx, B, name] = r[best] / r["AR"], r["dense"] / r["AR"]
            ms = t(K + K * len(sets[best])) * 1e3
            row += f"  {best:>13}{ms:8.2f}{r[best] / r['AR']:6.2f}x" * (name != "tpf7_5")
        print(row)

    def gb(n, ctx=4096):
        return f"{cost(1, n, ctx)[0] / 1e9:.2f} GB"
    print(f"bytes per step, batch 1, 4k: AR {gb(1)} ({gb(1, 0)} without the cache), {2 * K} tokens "
          f"{gb(2 * K)}, {K * (1 + K)} tokens {gb(K * (1 + K))} (docs/tidar.md: ~2.6, 16-17.7 GB)")
    for (what, gpu), row in REFERENCE.items():             # ours at the nearest batch, 4k
        for B, ref in row.items():
            near = min(batches, key=lambda b: abs(b - B))
            (m, _), (an, _), (b75, d75) = (sp[gpu, 4096, near, name] for name in acc)
            print(f"{what}, {gpu} batch {B}: {ref}x; ours at batch {near}: {m:.2f}x measured, "
                  f"{an:.2f}x anchor acceptance; at TPF 7.5 {b75:.2f}x (dense {d75:.2f}x)")


def draft_scales(a):
    """--draft_scales: lossless TiDAR at temperature 1 draws its drafts at T / draft_scale (still
    lossless: docs/tidar.md section 4). Tokens per forward of --init_from's model per scale: the
    mean over --prompts held-out prompts (train.heldout_prompts), per seed and over seeds; block
    the model's, every level drafted, --new_tokens each."""
    model, prompts = heldout_prompts(a.init_from, a.data, a.prompts)
    for scale in a.draft_scales:
        per_seed = []
        for seed in a.seeds:
            tpf = [generate_tidar(model, p[None], a.new_tokens, temperature=1.0, draft_scale=scale,
                                  generator=torch.Generator().manual_seed(seed))[1]
                   .tokens_per_forward for p in prompts]
            per_seed.append(sum(tpf) / len(tpf))
        seeds = " / ".join(f"{x:.2f}" for x in per_seed)
        say(f"lossless T=1, draft_scale {scale}, {len(prompts)} prompts",
            sum(per_seed) / len(per_seed), "tokens/forward", f"seeds {a.seeds}: {seeds}")


def decode_rows(a, model, tag):
    """AR, then TiDAR lossless, mix 0.5 and auto (compiled: also the fastest fixed level set) on
    one random prompt; then the forward latency curve (compiled: the graphed T only)."""
    x = tokens(model.config, (1, a.prompt_len), model.embed_tokens.weight.device)
    n = a.new_tokens
    K = model.config.block_size
    t_ar = timed(lambda: generate_ar(model, x, n), a)
    say(f"AR decode {tag}", n / t_ar, "tok/s", "1.00 tokens/forward")
    fixed = {str(g): dict(groups=g) for g in HAND_SETS if g[-1] < K} if tag == "compiled" else {}
    runs = {"lossless": {}, "mix": dict(sampler="mix"), **fixed, "auto": dict(groups="auto")}
    res = {}                                                # name -> (tokens/forward, seconds)
    for name, kw in runs.items():
        tpf = generate_tidar(model, x, n, **kw)[1].tokens_per_forward
        res[name] = (tpf, timed(lambda: generate_tidar(model, x, n, **kw), a))
    best = min(fixed, key=lambda k: res[k][1], default=None)
    for name, (tpf, t) in res.items():
        if name in fixed and name != best:
            continue
        say(f"TiDAR {name}{' (the best fixed set)' * (name == best)} (K={K}) {tag}", n / t,
            "tok/s", f"{tpf:.2f} tokens/forward, {t_ar / t:.2f}x AR")
    Ts = [2 ** i for i in range(20) if 2 ** i < K * (1 + K)] if tag == "eager" else [1]
    latency_curve(a, model, tag, Ts + [K * (1 + K)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kind, default, h in FLAGS:
        kw = dict(type=kind, default=default, nargs="*" if isinstance(default, list) else None)
        p.add_argument("--" + flag, help=h, **(dict(action="store_true") if kind is bool else kw))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(a.threads or torch.get_num_threads())
    if a.gpu8b:
        return gpu8b(a)
    if a.roofline:
        return roofline(a)
    if a.draft_scales:
        return draft_scales(a)
    device = torch.device(a.device)
    with torch.device(device):                  # every row on these weights
        model = (Zaya.from_pretrained(a.init_from, device=device) if a.init_from
                 else Zaya(ZayaConfig.from_name(a.config)).float()).eval()
    say(f"{a.init_from or 'random ' + a.config} model: parameters ({device.type}, fp32, "
        f"{torch.get_num_threads()} threads)", model.num_params() / 1e6, "M",
        f"{model.num_params(active=True) / 1e6:.2f} M active; loadavg {os.getloadavg()[0]:.1f}")
    bench_vs_reference(a, model, device)
    for tag in paths(a, model):                 # TiDAR vs AR decode, then the latency curve
        decode_rows(a, model, tag)


if __name__ == "__main__":
    main()
