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
  speedups on GPUs, from the shape alone. AR vs level sets vs auto: train.py --pipeline=eval.
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
from train import DEFAULTS, TrainLoss
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
    ("roofline", bool, False, "only predicted step times and speedups on GPUs (no weights)")]

timed = lambda fn, a: median_seconds(fn, a.reps, a.device)   # a warm-up, a.reps runs on a.device


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
    x, n = tokens(model.config, (1, a.prompt_len), device), a.new_tokens
    gen = lambda: ref.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # no_grad
    theirs, t_ref = gen(), timed(gen, a)
    say("AR decode, transformers ZayaForCausalLM.generate", n / t_ref, "tok/s")
    ours, t = generate_ar(model, x, n)[0], {}
    for tag in paths(a, model):                 # eager: vs the reference's tokens; compiled: ours
        t[tag] = timed(lambda: generate_ar(model, x, n), a)
        vs = "" if tag == "eager" else f"{t['eager'] / t[tag]:.2f}x eager, "
        same = torch.equal(ours, theirs if tag == "eager" else generate_ar(model, x, n)[0])
        say(f"AR decode, ours {tag} ({'generate_ar' if tag == 'eager' else 'kernels.enable'})",
            n / t[tag], "tok/s", f"{t_ref / t[tag]:.2f}x the reference, {vs}same tokens: {same}")
    # training tok/s: one step (forward + loss + backward + AdamW) on B rows of S + 1 tokens
    K, B, S = model.config.block_size, a.train_batch, a.train_len
    w = tokens(model.config, (B, S + 1), device, seed=2)
    def step(net, loss_fn):
        opt = torch.optim.AdamW(net.parameters(), lr=0.0)   # the weights stay
        return lambda: (loss_fn().backward(), opt.step(), opt.zero_grad(set_to_none=True))
    def our_step(mode):          # train.py's own loss (the paper's settings), one full-logit chunk
        s = SimpleNamespace(**{**DEFAULTS, "mode": mode, "block_size": K, "loss_chunk": 0})
        return step(model, lambda: TrainLoss(model, s)(w)[0])
    model.train(), ref.train()
    r_ref = B * S / timed(step(ref, lambda: ref(input_ids=w[:, :S], labels=w[:, :S]).loss), a)
    say(f"train AR step, transformers (B={B}, S={S})", r_ref, "tok/s")
    for tag in paths(a, model):                 # tok/s: B * S real tokens per step
        r_ar, r_td = B * S / timed(our_step("ar"), a), B * S / timed(our_step("tidar"), a)
        say(f"train AR step, ours {tag}", r_ar, "tok/s", f"{r_ar / r_ref:.2f}x the reference")
        say(f"train TiDAR step, ours {tag} (2S tokens per row)", r_td, "tok/s",
            f"{r_td / r_ar:.2f}x our AR step")
    model.eval(), ref.eval()


def latency_curve(a, model, tag, Ts, note=lambda T: ""):
    """{T: median seconds of a T-token forward (a verify/draft pass) after a.prefix cached tokens}:
    levels.LatencyCurve at batch 1, a.reps runs; note(T) ends each line."""
    out = LatencyCurve(model, 1, model.config.block_size, a.prefix, a.reps)
    for T in Ts:
        say(f"forward latency {tag}, prefix {a.prefix}, T={T}", out[T] * 1e3, "ms",
            f"{out[T] / out[Ts[0]]:.2f}x T=1{note(T)}")
    return out


def gpu8b(a):
    device, name, c = torch.device(a.device), a.gpu8b_config, ZayaConfig.from_name(a.gpu8b_config)
    with torch.device(device):
        model = Zaya(c).to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    K = c.block_size
    Ts = sorted({1, K, K * (1 + K)} | set(a.query_tokens or []))
    say(f"{name}: parameters ({device.type}, {model.embed_tokens.weight.dtype})",
        model.num_params() / 1e6, "M", f"{model.num_params(active=True) / 1e6:.1f} M active")
    kernels.enable(model, query_lengths=Ts)
    h200 = step_seconds(step_cost(c), *GPUS["H200"])              # the roofline's prediction
    note = lambda T: f"; H200 roofline {h200(1, T, a.prefix) * 1e3:.3g} ms (bf16)"
    try:
        tag, curve = "compiled", latency_curve(a, model, "compiled", Ts, note)
    except Exception as e:                                  # say why, then measure the eager path
        print(f"compiled path failed: {type(e).__name__}: {str(e)[:300]}; eager instead")
        tag, curve = "eager", latency_curve(a, kernels.disable(model), "eager", Ts, note)
    x, n = tokens(c, (1, a.prompt_len), device), a.new_tokens
    t = timed(lambda: generate_ar(model, x, n), a)
    say(f"{name}: AR decode, {tag}, batch 1", n / t, "tok/s")
    say(f"{name}: implied TiDAR speedup at TPF {a.tpf}",
        a.tpf * curve[1] / curve[K * (1 + K)], "x", f"= TPF * t(1) / t({K * (1 + K)})")
    kernels.disable(model)
    level_predictions(model, K, load_acceptance(a.acceptance, K, a.tpf), a.batches, a.prefix)


def load_acceptance(path, K, tpf):
    """Per-slot acceptance c from a reproduction's decode.json (its dense held-out run), else a
    constant c whose dense tokens per forward is `tpf` (random weights accept nothing)."""
    c = path and os.path.exists(path) and json.loads(Path(path).read_text()).get("acceptance")
    if c and len(c) == K + 1:
        print(f"acceptance per slot from {path}: dense TPF {level_rate(list(range(K)), c, K):.2f}")
        return c
    c = constant_acceptance(K, tpf)
    print(f"acceptance per slot: constant {c[0]:.3f} (dense TPF {tpf}); no decode.json at {path}")
    return c


def level_sets(K):
    """The level sets benchmarks compare: "dense" (all K levels) and each of sample.HAND_SETS."""
    return {"dense": list(range(K)), **{str(g): g for g in HAND_SETS}}


def rates(t, c, K, B):
    """Tokens/s at batch B of AR and each of level_sets(K), from per-slot acceptance c and t(n),
    the seconds of a step over n query tokens per row (AR: 1; a level set: K + K * len(levels))."""
    r = {k: B * level_rate(g, c, K) / t(K + K * len(g)) for k, g in level_sets(K).items()}
    return {"AR": B / t(1), **r}


def level_predictions(model, K, c, batches, prefix):
    """Tokens/s predicted from this machine's latency curve t(n) (eager, levels.calibrate) and
    acceptance c per batch size: AR, dense, the best hand-picked set, auto's (or AR: its margin)."""
    for B in batches:
        t = calibrate(model, B, K, prefix)
        rate = rates(t.__getitem__, c, K, B)
        best = max((str(g) for g in HAND_SETS), key=rate.get)
        levels, r = choose_levels(c, t.__getitem__, K)
        auto = levels if B * r >= rate["AR"] * (1 + AutoLevels().margin) else "AR"
        rate["auto"] = rate.get(str(auto), B * r)
        for name in ("AR", "dense", best, "auto"):
            suffix = " (best fixed)" if name == best else f" = {auto}" if name == "auto" else ""
            say(f"batch {B}: {name}" + suffix, rate[name], "tok/s",
                f"{rate[name] / rate['AR']:.2f}x AR, predicted from t(n) and acceptance")


# (bytes/s, dense bf16 FLOP/s): TIDAR.md section 6; the H100 (not there): the H100 SXM's public ones
GPUS = dict(H100=(3.35e12, 989e12), H200=(4.8e12, 989e12), MI300X=(5.3e12, 1307e12),
            MI355X=(8e12, 2500e12))
# TIDAR.md section 6: the roofline bound it quotes (4k context, 7.5 tokens per step) and Zyphra's
# measured speedups (their vLLM fork): {(what, device): {batch: speedup}}
REFERENCE = {("TIDAR.md's bound", "H100"): {1: "1.2", 4: "2.3", 16: "3.8", 64: "2.7-3"},
             ("Zyphra measured", "H100"): {1: "2.60", 8: "1.80", 16: "1.66", 64: "1.13"},
             ("Zyphra measured", "MI300X"): {1: "1.16", 8: "0.84-0.98", 64: "0.84-0.98"}}


def step_cost(c, w=2):
    """cost(B, n, ctx) = (bytes read, FLOPs) of a decode step of B rows of n query tokens (AR: 1; a
    level set: K + K * len(levels)) after ctx cached tokens, w-byte (bf16) weights and KV cache,
    from the config alone (TIDAR.md section 6). Bytes: each weight once per step, of the experts
    only the E(1 - (1 - 1/E)^N) per layer that N = B * n tokens are expected to wake under uniform
    top-1 routing (the skip class, kept unchosen by its bias -1, taken as never chosen: an upper
    bound), the whole tied head, the query tokens' embedding rows; per row the KV cache as KVCache
    holds it and CCA's fp32 state. FLOPs per query token: 2 x (those weights + one expert a layer +
    the head: a logit row each) + per layer 4 nq hd (ctx + n), attention over the cache and the
    step's own keys, masked but dense (zaya's KVCache.mask and update). Activations are taken to
    stay on chip."""
    L, E, d, R = c.num_hidden_layers, c.num_experts, c.hidden_size, c.router_hidden_size
    nq, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    C = (nq + nkv) * hd                                     # CCA's [q|k] conv channels
    attn = 2 * d * C + 2 * C * (hd + 2) + nkv               # q, k, v, o; 2 convs (+ bias); temp
    router = R * (d + 2 * R + E + 5)                        # down, norm, fc1, fc2, out (+ biases)
    # + per layer 2 norms and 2 residual scales; EDA scales after layer 0; input scale, bias, norm
    once = L * (attn + router + 10 * d) + (L - 1) * R + 3 * d
    expert, head = 3 * c.moe_intermediate_size * d, c.vocab_size * d   # gate, up, down; V x d
    kv, state = L * 2 * nkv * hd * w, L * 4 * (2 * C + nkv * hd // 2)  # bytes: a token, a row

    def cost(B, n, ctx):
        N = B * n                                           # query tokens in the step
        weights = once + L * E * (1 - (1 - 1 / E) ** N) * expert + head   # experts woken
        return (w * (weights + N * d) + B * (ctx * kv + state),
                N * (2 * (once + L * expert + head) + 4 * L * nq * hd * (ctx + n)))
    return cost


def step_seconds(cost, bandwidth, peak):
    """t(B, n, ctx) = max(bytes / bandwidth, FLOPs / peak): the roofline of a step_cost."""
    return lambda B, n, ctx: max(x / y for x, y in zip(cost(B, n, ctx), (bandwidth, peak)))


def roofline(a):
    """--roofline: step times t(step) = max(bytes / bandwidth, FLOPs / peak) (step_cost) and TiDAR
    speedups, B x TPF / t(step) over AR's B / t(AR step), predicted on GPUS from --gpu8b_config's
    shape alone (TIDAR.md section 6); TPF: level_rate of the fastest of level_sets at the measured
    acceptance (load_acceptance) and the anchors' (constant: dense TPF 8.25, TiDAR 8B's, sec. 5)."""
    c = ZayaConfig.from_name(a.gpu8b_config)
    K, cost, sets, batches = c.block_size, step_cost(c), level_sets(c.block_size), (1, 4, 16, 64)
    acc = dict(measured=load_acceptance(a.acceptance, K, a.tpf),
               anchor=constant_acceptance(K, 8.25), tpf7_5=constant_acceptance(K, 7.5))
    print(f"roofline, {a.gpu8b_config}, bf16; at the measured, then the anchor acceptance: best "
          f"set, its step ms and speedup\n{'device ctx B':<15}{'AR ms':>9}{'dense ms':>9}"
          + "  {:>13}{:>8}{:>7}".format("best set", "its ms", "x AR") * 2)
    sp = {}                                        # (gpu, ctx, B, acceptance): best, dense speedup
    for (gpu, roof), ctx, B in itertools.product(GPUS.items(), (4096, 32768), batches):
        t = lambda n: step_seconds(cost, *roof)(B, n, ctx)
        row = f"{gpu:<7}{ctx // 1024:>3}k{B:>4}{t(1) * 1e3:9.2f}{t(K * (1 + K)) * 1e3:9.2f}"
        for name, c_acc in acc.items():
            r = rates(t, c_acc, K, B)
            best = max(sets, key=r.get)
            sp[gpu, ctx, B, name] = r[best] / r["AR"], r["dense"] / r["AR"]
            ms = t(K + K * len(sets[best])) * 1e3
            row += f"  {best:>13}{ms:8.2f}{r[best] / r['AR']:6.2f}x" * (name != "tpf7_5")
        print(row)
    gb = lambda n, ctx=4096: f"{cost(1, n, ctx)[0] / 1e9:.2f} GB"
    print(f"bytes per step, batch 1, 4k: AR {gb(1)} ({gb(1, 0)} without the cache), {2 * K} tokens "
          f"{gb(2 * K)}, {K * (1 + K)} tokens {gb(K * (1 + K))} (TIDAR.md: ~2.6, 16-17.7 GB)")
    for (what, gpu), row in REFERENCE.items():             # ours at the nearest batch, 4k
        for B, ref in row.items():
            near = min(batches, key=lambda b: abs(b - B))
            (m, _), (an, _), (b75, d75) = (sp[gpu, 4096, near, name] for name in acc)
            print(f"{what}, {gpu} batch {B}: {ref}x; ours at batch {near}: {m:.2f}x measured, "
                  f"{an:.2f}x anchor acceptance; at TPF 7.5 {b75:.2f}x (dense {d75:.2f}x)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kind, default, h in FLAGS:
        kw = dict(type=kind, default=default, nargs="*" if isinstance(default, list) else None)
        p.add_argument("--" + flag, help=h, **(dict(action="store_true") if kind is bool else kw))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(a.threads or torch.get_num_threads())
    if a.gpu8b or a.roofline:
        return gpu8b(a) if a.gpu8b else roofline(a)
    device = torch.device(a.device)
    with torch.device(device):                  # every row on these weights
        model = (Zaya.from_pretrained(a.init_from, device=device) if a.init_from
                 else Zaya(ZayaConfig.from_name(a.config)).float()).eval()
    say(f"{a.init_from or 'random ' + a.config} model: parameters ({device.type}, fp32, "
        f"{torch.get_num_threads()} threads)", model.num_params() / 1e6, "M",
        f"{model.num_params(active=True) / 1e6:.2f} M active; loadavg {os.getloadavg()[0]:.1f}")
    bench_vs_reference(a, model, device)
    x, n, K = tokens(model.config, (1, a.prompt_len), device), a.new_tokens, model.config.block_size
    for tag in paths(a, model):                 # TiDAR vs AR decode, then the latency curve
        t_ar = timed(lambda: generate_ar(model, x, n), a)
        say(f"AR decode {tag}", n / t_ar, "tok/s", "1.00 tokens/forward")
        sets = {str(g): {"groups": g} for g in HAND_SETS if g[-1] < K} if tag == "compiled" else {}
        runs = {"lossless": {}, "mix": {"sampler": "mix"}, **sets, "auto": {"groups": "auto"}}
        tidar = lambda kw: lambda: generate_tidar(model, x, n, **kw)
        res = {k: (tidar(w)()[1].tokens_per_forward, timed(tidar(w), a)) for k, w in runs.items()}
        best = min((k for k in res if k[0] == "["), key=lambda k: res[k][1], default=None)
        for name, (tpf, t) in ((k, v) for k, v in res.items() if k[0] != "[" or k == best):
            say(f"TiDAR {name}{' (the best fixed set)' * (name == best)} (K={K}) {tag}", n / t,
                "tok/s", f"{tpf:.2f} tokens/forward, {t_ar / t:.2f}x AR")
        Ts = [2 ** i for i in range(20) if 2 ** i < K * (1 + K)] if tag == "eager" else [1]
        latency_curve(a, model, tag, Ts + [K * (1 + K)])        # compiled: the graphed T only


if __name__ == "__main__":
    main()
