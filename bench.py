"""
Benchmarks, one line per measurement, every ratio of numbers measured side by side in this run:
- on a random --config model, ours vs transformers' ZayaForCausalLM on the same weights: AR
  decode tok/s (batch 1, greedy; eager and compiled: kernels.enable) and training tok/s (our AR
  and TiDAR steps vs its AR step; a step: forward, loss, backward, AdamW);
- TiDAR (lossless, mix 0.5) vs our AR (tok/s, tokens per forward: TPF), and forward latency vs
  query tokens T = 1, 2, 4, ..., K(1+K) after a cached prefix, on --init_from's model if given;
- --gpu8b: that curve and AR decode on an 8B-shaped random bf16 model (CUDA; --gpu8b_config tiny
  --device cpu tests it), the TiDAR speedup implied at --tpf, TPF * t(1) / t(K(1+K)), and level
  sets' predicted tok/s per batch; --levels: AR vs level sets vs auto on --init_from's model.
Random weights' tokens mean nothing: their speeds and TPF are only this code's.
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import kernels
from levels import AutoLevels, calibrate, choose_levels, level_rate
from sample import HAND_SETS, LEVEL_SETTINGS, generate_ar, generate_tidar, levels_report
from train import DEFAULTS, TrainLoss, heldout_prompts
from zaya import KVCache, Zaya, ZayaConfig, causal_layout

FLAGS = [  # (flag, type, default, help); type bool: a switch; a list default: nargs="*"
    ("init_from", str, None, "a checkpoint for the TiDAR/AR part (default: a random model)"),
    ("config", str, "small", "random model's preset"), ("threads", int, 0, "CPUs (0: torch's)"),
    ("device", str, "cuda" if torch.cuda.is_available() else "cpu", None),
    ("compile", lambda s: s.lower() in ("1", "true", "yes"), True, None),
    ("prompt_len", int, 32, None), ("new_tokens", int, 128, None), ("reps", int, 3, None),
    ("prefix", int, 256, None), ("train_batch", int, 4, None), ("train_len", int, 256, None),
    ("gpu8b", bool, False, "only the 8B-shaped latency curve, decode and levels (needs CUDA)"),
    ("gpu8b_config", str, "zaya1-8b", "preset for --gpu8b ('tiny' tests it on a CPU)"),
    ("query_tokens", int, [], "--gpu8b: more T"), ("tpf", float, 3.0, "TPF of the implied speedup"),
    ("acceptance", str, "out/decode.json", "--gpu8b: per-slot acceptance from a reproduction"),
    ("batches", int, [1, 16], "--gpu8b: batch sizes for the level sets"),
    ("levels", bool, False, "only AR vs TiDAR level sets vs auto on --init_from's model"),
    ("data", str, "stdlib", "the corpus whose held-out split gives --levels its prompts")]


def timed(fn, a):
    """Median wall seconds of fn() over a.reps runs, after one warm-up run (compiles happen)."""
    sync = torch.cuda.synchronize if torch.device(a.device).type == "cuda" else (lambda: None)
    fn(), sync()
    ts = []
    for _ in range(a.reps):                     # each run ends synced, so the next starts clean
        t0 = time.perf_counter()
        fn(), sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


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
        kernels.enable(model)                             # graphs for T = 1 and K(1+K), training
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
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
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


def latency_curve(a, model, device, tag, Ts):
    """{T: median seconds of a causal T-token forward (a verify/draft pass) after a.prefix}."""
    c, P, out = model.config, a.prefix, {}
    cache = KVCache(c, 1, P + max(Ts), dtype=model.embed_tokens.weight.dtype, device=device)
    x = tokens(c, (1, P + max(Ts)), device)
    with torch.no_grad():
        pos, pred, mask = causal_layout(P, device)
        model.forward_hidden(x[:, :P], pos, pred, mask, cache)
        cache.commit(torch.tensor([P], device=device))
        for T in Ts:
            idx, (pos, pred, mask) = x[:, P:P + T].contiguous(), causal_layout(T, device, start=P)
            out[T] = timed(lambda: model.forward_hidden(idx, pos, pred, mask, cache), a)
            say(f"forward latency {tag}, prefix {P}, T={T}", out[T] * 1e3, "ms",
                f"{out[T] / out[Ts[0]]:.2f}x T=1")
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
    try:
        tag, curve = "compiled", latency_curve(a, model, device, "compiled", Ts)
    except Exception as e:                                  # say why, then measure the eager path
        print(f"compiled path failed: {type(e).__name__}: "
              f"{(str(e).splitlines() or [''])[0][:300]}; eager instead")
        tag, curve = "eager", latency_curve(a, kernels.disable(model), device, "eager", Ts)
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
    lo, hi = 0.0, 1.0
    for _ in range(50):                                     # bisect c: dense TPF(c) = tpf
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if level_rate(list(range(K)), [mid] * (K + 1), K) < tpf else (lo, mid)
    print(f"acceptance per slot: constant {lo:.3f} (dense TPF {tpf}); no decode.json at {path}")
    return [lo] * (K + 1)


def level_predictions(model, K, c, batches, prefix):
    """Tokens/s predicted from this machine's latency curve t(n) (eager, levels.calibrate) and
    acceptance c per batch size: AR, dense, the best hand-picked set, auto's (or AR: its margin)."""
    rows = []
    for B in batches:
        t = calibrate(model, B, K, prefix)
        rate = {"AR": B / t[1], "dense": B * level_rate(list(range(K)), c, K) / t[K * (K + 1)]}
        rate.update({str(g): B * level_rate(g, c, K) / t[K + K * len(g)] for g in HAND_SETS})
        best = max((str(g) for g in HAND_SETS), key=rate.get)
        levels, r = choose_levels(c, t.__getitem__, K)
        auto = levels if B * r >= rate["AR"] * (1 + AutoLevels().margin) else "AR"
        rate["auto"] = rate.get(str(auto), B * r)
        for name in ("AR", "dense", best, "auto"):
            suffix = " (best fixed)" if name == best else f" = {auto}" if name == "auto" else ""
            say(f"batch {B}: {name}" + suffix, rate[name], "tok/s",
                f"{rate[name] / rate['AR']:.2f}x AR, predicted from t(n) and acceptance")
        rows.append(dict(batch=B, chosen=auto, best_fixed=best, tokens_per_s=rate))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kind, default, h in FLAGS:
        kw = dict(type=kind, default=default, nargs="*" if isinstance(default, list) else None)
        p.add_argument("--" + flag, help=h, **(dict(action="store_true") if kind is bool else kw))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(a.threads or torch.get_num_threads())
    if a.levels:                                        # python bench.py --levels --init_from=out
        model, prompts = heldout_prompts(a.init_from or "out", a.data, 8)
        with torch.no_grad():
            return levels_report(model, prompts, model.config.block_size, a.new_tokens,
                                 LEVEL_SETTINGS, a.reps)
    if a.gpu8b:
        return gpu8b(a)
    device = torch.device(a.device)
    with torch.device(device):
        model = Zaya(ZayaConfig.from_name(a.config)).float().eval()
    say(f"random '{a.config}' model: parameters ({device.type}, fp32, "
        f"{torch.get_num_threads()} threads)", model.num_params() / 1e6, "M",
        f"{model.num_params(active=True) / 1e6:.2f} M active; load average "
        f"{os.getloadavg()[0]:.1f} (other processes on these cores distort every number)")
    bench_vs_reference(a, model, device)
    model = Zaya.from_pretrained(a.init_from, device=device).eval() if a.init_from else model
    x, n, K = tokens(model.config, (1, a.prompt_len), device), a.new_tokens, model.config.block_size
    for tag in paths(a, model):                 # TiDAR vs AR decode, then the latency curve
        t_ar = timed(lambda: generate_ar(model, x, n), a)
        say(f"AR decode {tag}", n / t_ar, "tok/s", "1.00 tokens/forward")
        for sampler in ("lossless", "mix"):
            run = lambda: generate_tidar(model, x, n, sampler=sampler, mix_weight=0.5)
            st, t = run()[1], timed(run, a)
            say(f"TiDAR {sampler} (K={K}) {tag}", n / t, "tok/s",
                f"{st.tokens_per_forward:.2f} tokens/forward, {t_ar / t:.2f}x AR")
        Ts = [2 ** i for i in range(20) if 2 ** i < K * (1 + K)] if tag == "eager" else [1]
        latency_curve(a, model, device, tag, Ts + [K * (1 + K)])  # compiled: the graphed T only


if __name__ == "__main__":
    main()
