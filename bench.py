"""
Benchmarks, each printing ratios measured side by side in one run. Run: python bench.py [--flags].

One line per measurement, and every ratio from numbers measured side by side in this run:
- AR decode tokens/s, batch 1, greedy: ours eager and compiled (kernels.enable) vs transformers'
  ZayaForCausalLM.generate on identical weights (saved with save_pretrained, loaded by
  transformers);
- TiDAR (lossless and mix 0.5) vs our AR on one model: tokens/s and tokens per forward;
- training tokens/s: our AR step and TiDAR step (forward + loss + backward + AdamW) vs the
  reference's AR step;
- forward latency vs query tokens T = 1, 2, 4, ..., K(1+K) after a cached prefix: the "free token
  slots";
- --gpu8b: the same curve and AR decode on an 8B-shaped random bf16 model on CUDA, and the TiDAR
  speedup implied at a tokens-per-forward (TPF): speedup = TPF * t(1) / t(K(1+K)).
  --gpu8b_config tiny --device cpu tests it here.
A random model's tokens mean nothing; its speeds and TPF are only those of this code (use
--init_from for a model).
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
from train import TrainLoss, heldout_prompts
from zaya import KVCache, Zaya, ZayaConfig, causal_layout


def timed(fn, reps, device):
    """Median wall seconds of fn() over reps runs, after one warm-up run (compiles happen there)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def say(what, value, unit, extra=""):
    print(f"{what:<58} {value:>10.2f} {unit}{'  ' + extra if extra else ''}", flush=True)


def random_model(config, dtype, device):
    with torch.device(device):
        return Zaya(config).to(dtype).eval()


def prompt_for(config, n, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(256, config.vocab_size), (1, n), generator=g).to(device)


def bench_ar_vs_reference(a, model, device):
    import transformers
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        ref = transformers.ZayaForCausalLM.from_pretrained(
            d, dtype=model.embed_tokens.weight.dtype).to(device).eval()
    x = prompt_for(model.config, a.prompt_len, device)
    n = a.new_tokens
    ours = generate_ar(model, x, n)[0]
    with torch.no_grad():
        theirs = ref.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    t_ref = timed(lambda: ref.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False),
                  a.reps, device)
    t_eager = timed(lambda: generate_ar(model, x, n), a.reps, device)
    say("AR decode, transformers ZayaForCausalLM.generate", n / t_ref, "tok/s")
    say("AR decode, ours eager (generate_ar)", n / t_eager, "tok/s",
        f"{t_ref / t_eager:.2f}x the reference, same tokens: {torch.equal(ours, theirs)}")
    if a.compile:
        kernels.enable(model)
        t_fast = timed(lambda: generate_ar(model, x, n), a.reps, device)
        say("AR decode, ours compiled (kernels.enable)", n / t_fast, "tok/s",
            f"{t_ref / t_fast:.2f}x the reference, {t_eager / t_fast:.2f}x eager, "
            f"same tokens: {torch.equal(generate_ar(model, x, n)[0], ours)}")
        kernels.disable(model)
    return ref


def bench_tidar(a, model, device, tag):
    x = prompt_for(model.config, a.prompt_len, device)
    n = a.new_tokens
    t_ar = timed(lambda: generate_ar(model, x, n), a.reps, device)
    say(f"AR decode {tag}", n / t_ar, "tok/s", "1.00 tokens/forward")
    for sampler in ("lossless", "mix"):
        st = generate_tidar(model, x, n, sampler=sampler, mix_weight=0.5)[1]
        t = timed(lambda: generate_tidar(model, x, n, sampler=sampler, mix_weight=0.5),
                  a.reps, device)
        say(f"TiDAR {sampler} (K={model.config.block_size}) {tag}", n / t, "tok/s",
            f"{st.tokens_per_forward:.2f} tokens/forward, {t_ar / t:.2f}x AR")


def bench_training(a, model, ref, device):
    c = model.config
    B, S = a.train_batch, a.train_len
    x = torch.randint(0, min(256, c.vocab_size), (B, S + 1),
                      generator=torch.Generator().manual_seed(2)).to(device)

    def step(net, loss_fn):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
        return lambda: (loss_fn().backward(), opt.step(), opt.zero_grad(set_to_none=True))

    def losses(mode):  # train.py's own losses: one full-logit chunk, alpha = 1
        settings = SimpleNamespace(mode=mode, alpha=1.0, block_size=c.block_size, loss_chunk=0)
        return lambda: TrainLoss(model, settings)(x)[0]

    model.train()
    ref.train()
    t_ref = timed(step(ref, lambda: ref(input_ids=x[:, :S], labels=x[:, :S]).loss), a.reps, device)
    say(f"train AR step, transformers (B={B}, S={S})", B * S / t_ref, "tok/s")
    for tag in ("eager", "compiled") if a.compile else ("eager",):
        if tag == "compiled":
            kernels.enable(model)
        t_ar = timed(step(model, losses("ar")), a.reps, device)
        t_td = timed(step(model, losses("tidar")), a.reps, device)
        say(f"train AR step, ours {tag}", B * S / t_ar, "tok/s",
            f"{t_ref / t_ar:.2f}x the reference")
        say(f"train TiDAR step, ours {tag} (2S tokens per row)", B * S / t_td, "tok/s",
            f"{t_ar / t_td:.2f}x our AR step")
    kernels.disable(model)
    model.eval()
    ref.eval()


def latency_curve(a, model, device, tag, Ts):
    """Median forward latency of T query tokens (causal, as a verify/draft pass) after a cached
    prefix."""
    c = model.config
    cache = KVCache(c, 1, a.prefix + max(Ts), dtype=model.embed_tokens.weight.dtype, device=device)
    x = prompt_for(c, a.prefix + max(Ts), device)
    with torch.no_grad():
        pos, pred, mask = causal_layout(a.prefix, device)
        model.forward_hidden(x[:, :a.prefix], pos, pred, mask, cache)
        cache.commit(torch.tensor([a.prefix], device=device))
        out = {}
        for T in Ts:
            pos, pred, mask = causal_layout(T, device, start=a.prefix)
            idx = x[:, a.prefix:a.prefix + T].contiguous()
            out[T] = timed(lambda: model.forward_hidden(idx, pos, pred, mask, cache),
                           a.reps, device)
            say(f"forward latency {tag}, prefix {a.prefix}, T={T}", out[T] * 1e3, "ms",
                f"{out[T] / out[Ts[0]]:.2f}x T=1")
    return out


def gpu8b(a):
    device = torch.device(a.device)
    c = ZayaConfig.from_name(a.gpu8b_config)
    model = random_model(c, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    K = c.block_size
    Ts = sorted({1, K, K * (1 + K)} | set(a.query_tokens or []))
    say(f"{a.gpu8b_config}: parameters ({device.type}, {model.embed_tokens.weight.dtype})",
        model.num_params() / 1e6, "M", f"{model.num_params(active=True) / 1e6:.1f} M active")
    kernels.enable(model, query_lengths=Ts)
    try:
        tag = "compiled"
        curve = latency_curve(a, model, device, "compiled", Ts)
    except Exception as e:                                  # say why, then measure the eager path
        print(f"compiled path failed: {type(e).__name__}: "
              f"{(str(e).splitlines() or [''])[0][:300]}; eager instead")
        tag = "eager"
        curve = latency_curve(a, kernels.disable(model), device, "eager", Ts)
    x = prompt_for(c, a.prompt_len, device)
    t = timed(lambda: generate_ar(model, x, a.new_tokens), a.reps, device)
    say(f"{a.gpu8b_config}: AR decode, {tag}, batch 1", a.new_tokens / t, "tok/s")
    say(f"{a.gpu8b_config}: implied TiDAR speedup at TPF {a.tpf}",
        a.tpf * curve[1] / curve[K * (1 + K)], "x", f"= TPF * t(1) / t({K * (1 + K)})")
    kernels.disable(model)
    level_predictions(model, K, load_acceptance(a.acceptance, K, a.tpf), a.batches, a.prefix)


def load_acceptance(path, K, tpf):
    """Per-slot acceptance c from a reproduction's decode.json (its dense held-out run), else a
    constant c whose dense tokens per forward is `tpf` (random weights accept nothing, so the
    8B-shaped runs borrow it)."""
    if path and os.path.exists(path):
        c = json.loads(Path(path).read_text()).get("acceptance")
        if c and len(c) == K + 1:
            print(f"acceptance per slot from {path}: "
                  f"dense TPF {level_rate(list(range(K)), c, K):.2f}")
            return c
    lo, hi = 0.0, 1.0
    for _ in range(50):                                     # bisect c: dense TPF(c) = tpf
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if level_rate(list(range(K)), [mid] * (K + 1), K) < tpf else (lo, mid)
    print(f"acceptance per slot: constant {lo:.3f} (dense TPF {tpf}); no decode.json at {path}")
    return [lo] * (K + 1)


def level_predictions(model, K, c, batches, prefix):
    """Tokens/s predicted from this machine's measured latency curve t(n) (eager, levels.calibrate)
    and acceptance c, at each batch size: AR, dense, the best hand-picked set, and the set auto
    would choose (or AR, with its margin)."""
    rows = []
    for B in batches:
        t = calibrate(model, B, K, prefix)
        rate = {"AR": B / t[1], "dense": B * level_rate(list(range(K)), c, K) / t[K * (K + 1)]}
        for g in HAND_SETS:
            rate[str(g)] = B * level_rate(g, c, K) / t[K + K * len(g)]
        best = max((str(g) for g in HAND_SETS), key=rate.get)
        levels, r = choose_levels(c, t.__getitem__, K)
        auto = levels if B * r >= rate["AR"] * (1 + AutoLevels().margin) else "AR"
        rate["auto"] = rate[str(auto)] if str(auto) in rate else B * r
        for name in ("AR", "dense", best, "auto"):
            suffix = " (best fixed)" if name == best else f" = {auto}" if name == "auto" else ""
            say(f"batch {B}: {name}" + suffix, rate[name], "tok/s",
                f"{rate[name] / rate['AR']:.2f}x AR, predicted from t(n) and acceptance")
        rows.append(dict(batch=B, chosen=auto, best_fixed=best, tokens_per_s=rate))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", default=None,
                   help="a checkpoint for the TiDAR/AR part (default: a random model)")
    p.add_argument("--config", default="small", help="preset of the random model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prefix", type=int, default=256)
    p.add_argument("--train_batch", type=int, default=4)
    p.add_argument("--train_len", type=int, default=256)
    p.add_argument("--gpu8b", action="store_true",
                   help="only the 8B-shaped latency curve and decode (needs CUDA)")
    p.add_argument("--gpu8b_config", default="zaya1-8b",
                   help="preset for --gpu8b ('tiny' tests it on a CPU)")
    p.add_argument("--query_tokens", type=int, nargs="*", help="extra T for the --gpu8b curve")
    p.add_argument("--tpf", type=float, default=3.0,
                   help="tokens per forward for the implied speedup")
    p.add_argument("--acceptance", default="out/decode.json",
                   help="--gpu8b: per-slot acceptance from a reproduction")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 16],
                   help="--gpu8b: batch sizes for the level sets")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--levels", action="store_true",
                   help="only AR vs TiDAR level sets vs auto on --init_from's model")
    p.add_argument("--data", default="stdlib",
                   help="the corpus whose held-out split gives --levels its prompts")
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
    model = random_model(ZayaConfig.from_name(a.config), torch.float32, device)
    say(f"random '{a.config}' model: parameters "
        f"({device.type}, fp32, {torch.get_num_threads()} threads)",
        model.num_params() / 1e6, "M",
        f"{model.num_params(active=True) / 1e6:.2f} M active; load average "
        f"{os.getloadavg()[0]:.1f} (other processes on these cores distort every number)")
    ref = bench_ar_vs_reference(a, model, device)
    bench_training(a, model, ref, device)
    if a.init_from:
        model = Zaya.from_pretrained(a.init_from, device=device).eval()
    K = model.config.block_size
    Ts = [2 ** i for i in range(20) if 2 ** i < K * (1 + K)] + [K * (1 + K)]
    bench_tidar(a, model, device, "eager")
    latency_curve(a, model, device, "eager", Ts)
    if a.compile:
        kernels.enable(model)                                          # graphs for T = 1 and K(1+K)
        bench_tidar(a, model, device, "compiled")
        latency_curve(a, model, device, "compiled", [1, K * (1 + K)])
        kernels.disable(model)


if __name__ == "__main__":
    main()
