"""
Benchmarks, each printing ratios measured side by side in one run. Run: python bench.py [--flags] (or python sample.py --bench ...).

One line per measurement, and every ratio from numbers measured side by side in this run:
- AR decode tokens/s, batch 1, greedy: ours eager and compiled (kernels.enable) vs transformers' ZayaForCausalLM
  .generate on identical weights (saved with save_pretrained, loaded by transformers);
- TiDAR (lossless and mix 0.5) vs our AR on one model: tokens/s and tokens per forward;
- training tokens/s: our AR step and TiDAR step (forward + loss + backward + AdamW) vs the reference's AR step;
- forward latency vs query tokens T = 1, 2, 4, ..., K(1+K) after a cached prefix: the "free token slots";
- --gpu8b: the same curve and AR decode on an 8B-shaped random bf16 model on CUDA, and the TiDAR speedup implied
  at a tokens-per-forward (TPF): speedup = TPF * t(1) / t(K(1+K)). --gpu8b_config tiny --device cpu tests it here.
A random model's tokens mean nothing; its speeds and TPF are only those of this code (use --init_from for a model).
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sample import generate_ar, generate_tidar
from zaya import KVCache, Zaya, ZayaConfig, causal_layout, tidar_step_layout


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
    import kernels                                                  # torch.compile machinery: only when used
    import transformers
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        ref = transformers.ZayaForCausalLM.from_pretrained(d, dtype=model.embed_tokens.weight.dtype).to(device).eval()
    x, n = prompt_for(model.config, a.prompt_len, device), a.new_tokens
    ours = generate_ar(model, x, n)[0]
    with torch.no_grad():
        theirs = ref.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    t_ref = timed(lambda: ref.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False), a.reps, device)
    t_eager = timed(lambda: generate_ar(model, x, n), a.reps, device)
    say("AR decode, transformers ZayaForCausalLM.generate", n / t_ref, "tok/s")
    say("AR decode, ours eager (generate_ar)", n / t_eager, "tok/s", f"{t_ref / t_eager:.2f}x the reference, "
        f"same tokens: {torch.equal(ours, theirs)}")
    if a.compile:
        kernels.enable(model)
        t_fast = timed(lambda: generate_ar(model, x, n), a.reps, device)
        say("AR decode, ours compiled (kernels.enable)", n / t_fast, "tok/s", f"{t_ref / t_fast:.2f}x the reference, "
            f"{t_eager / t_fast:.2f}x eager, same tokens: {torch.equal(generate_ar(model, x, n)[0], ours)}")
        kernels.disable(model)
    return ref


def bench_tidar(a, model, device, tag):
    x, n = prompt_for(model.config, a.prompt_len, device), a.new_tokens
    t_ar = timed(lambda: generate_ar(model, x, n), a.reps, device)
    say(f"AR decode {tag}", n / t_ar, "tok/s", "1.00 tokens/forward")
    for sampler in ("lossless", "mix"):
        st = generate_tidar(model, x, n, sampler=sampler, mix_weight=0.5)[1]
        t = timed(lambda: generate_tidar(model, x, n, sampler=sampler, mix_weight=0.5), a.reps, device)
        say(f"TiDAR {sampler} (K={model.config.block_size}) {tag}", n / t, "tok/s",
            f"{st.tokens_per_forward:.2f} tokens/forward, {t_ar / t:.2f}x AR")


def bench_training(a, model, ref, device):
    import kernels                                                  # torch.compile machinery: only when used
    c, B, S = model.config, a.train_batch, a.train_len
    x = torch.randint(0, min(256, c.vocab_size), (B, S + 1), generator=torch.Generator().manual_seed(2)).to(device)

    def step(net, loss_fn):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
        return lambda: (loss_fn().backward(), opt.step(), opt.zero_grad(set_to_none=True))

    def tidar_loss():                                                  # (CE_AR + CE_diff) / 2: alpha = 1
        logits = torch.cat(model.forward_tidar(x[:, :S]), 1)
        return F.cross_entropy(logits.flatten(0, 1).float(), torch.cat([x[:, 1:], x[:, :S]], 1).flatten())
    model.train(), ref.train()
    t_ref = timed(step(ref, lambda: ref(input_ids=x[:, :S], labels=x[:, :S]).loss), a.reps, device)
    say(f"train AR step, transformers (B={B}, S={S})", B * S / t_ref, "tok/s")
    for tag in ("eager", "compiled") if a.compile else ("eager",):
        if tag == "compiled":
            kernels.enable(model)
        t_ar = timed(step(model, lambda: model(x[:, :S], x[:, 1:])[1]), a.reps, device)
        t_td = timed(step(model, tidar_loss), a.reps, device)
        say(f"train AR step, ours {tag}", B * S / t_ar, "tok/s", f"{t_ref / t_ar:.2f}x the reference")
        say(f"train TiDAR step, ours {tag} (2S tokens per row)", B * S / t_td, "tok/s",
            f"{t_ar / t_td:.2f}x our AR step")
    kernels.disable(model)
    model.eval(), ref.eval()


def latency_curve(a, model, device, tag, Ts):
    """Median forward latency of T query tokens (causal, as a verify/draft pass) after a cached prefix."""
    c = model.config
    cache = KVCache(c, 1, a.prefix + max(Ts), dtype=model.embed_tokens.weight.dtype, device=device)
    x = prompt_for(c, a.prefix + max(Ts), device)
    with torch.no_grad():
        pos, pred, mask = causal_layout(a.prefix, device)
        model.forward_hidden(x[:, :a.prefix], pos, pred, mask, cache)
        cache.commit(torch.tensor([a.prefix], device=device))
        out = {}
        for T in Ts:
            pos, pred, mask = causal_layout(T, device)
            idx, pos = x[:, a.prefix:a.prefix + T].contiguous(), (pos + a.prefix)[None]
            out[T] = timed(lambda: model.forward_hidden(idx, pos, pred[None], mask, cache), a.reps, device)
            say(f"forward latency {tag}, prefix {a.prefix}, T={T}", out[T] * 1e3, "ms",
                f"{out[T] / out[Ts[0]]:.2f}x T=1")
    return out


def gpu8b(a):
    import kernels                                                  # torch.compile machinery: only when used
    device = torch.device(a.device)
    c = ZayaConfig.from_name(a.gpu8b_config)
    model = random_model(c, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    K = c.block_size
    Ts = sorted({1, K, K * (1 + K)} | set(a.query_tokens or []))
    say(f"{a.gpu8b_config}: parameters ({device.type}, {model.embed_tokens.weight.dtype})", model.num_params() / 1e6,
        "M", f"{model.num_params(active=True) / 1e6:.1f} M active")
    kernels.enable(model, query_lengths=Ts)
    try:
        tag, curve = "compiled", latency_curve(a, model, device, "compiled", Ts)
    except Exception as e:                                             # say why, then measure the eager path
        print(f"compiled path failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}; eager instead")
        tag, curve = "eager", latency_curve(a, kernels.disable(model), device, "eager", Ts)
    x = prompt_for(c, a.prompt_len, device)
    t = timed(lambda: generate_ar(model, x, a.new_tokens), a.reps, device)
    say(f"{a.gpu8b_config}: AR decode, {tag}, batch 1", a.new_tokens / t, "tok/s")
    say(f"{a.gpu8b_config}: implied TiDAR speedup at TPF {a.tpf}", a.tpf * curve[1] / curve[K * (1 + K)], "x",
        f"= TPF * t(1) / t({K * (1 + K)})")
    kernels.disable(model)
    level_predictions(model, K, load_acceptance(a.acceptance, K, a.tpf), a.batches, a.prefix)


def load_acceptance(path, K, tpf):
    """Per-slot acceptance c from a reproduction's decode.json (its dense held-out run), else a constant c whose
    dense tokens per forward is `tpf` (random weights accept nothing, so the 8B-shaped runs borrow it)."""
    from levels import level_rate
    if path and os.path.exists(path):
        c = json.loads(Path(path).read_text()).get("acceptance")
        if c and len(c) == K + 1:
            print(f"acceptance per slot from {path}: dense TPF {level_rate(list(range(K)), c, K):.2f}")
            return c
    lo, hi = 0.0, 1.0
    for _ in range(50):                                                # bisect c: dense TPF(c) = tpf
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if level_rate(list(range(K)), [mid] * (K + 1), K) < tpf else (lo, mid)
    print(f"acceptance per slot: constant {lo:.3f} (dense TPF {tpf}); no decode.json at {path}")
    return [lo] * (K + 1)


def level_predictions(model, K, c, batches, prefix):
    """Tokens/s predicted from this machine's measured latency curve t(n) (eager, levels.calibrate) and acceptance c,
    at each batch size: AR, dense, the best hand-picked set, and the set auto would choose (or AR, with its margin)."""
    from levels import AutoLevels, calibrate, choose_levels, level_rate
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
            say(f"batch {B}: {name}" + (" (best fixed)" if name == best else f" = {auto}" if name == "auto" else ""),
                rate[name], "tok/s", f"{rate[name] / rate['AR']:.2f}x AR, predicted from t(n) and acceptance")
        rows.append(dict(batch=B, chosen=auto, best_fixed=best, tokens_per_s=rate))
    return rows


# -----------------------------------------------------------------------------
# the small reproduction: `python train.py` runs reproduce() (README, "Results")

PIPELINES = {  # (AR pretraining, TiDAR conversion) settings; measured 11 min / 87 min on a 2-core CPU
    "default": (dict(preset="small", max_iters=1500, eval_interval=500, log_interval=100),
                dict(max_iters=900, lr=2e-3, min_lr=2e-4, eval_interval=300, log_interval=100)),
    "long": (dict(preset="medium", max_iters=2000, lr=2e-3, eval_interval=500, log_interval=100),
             dict(max_iters=1000, lr=1e-3, min_lr=1e-4, eval_interval=250, log_interval=50))}


def reproduce(o):
    """AR pretraining -> TiDAR conversion (block 16) -> decoding report; the model ends in out_dir/ckpt.pt."""
    from train import DEFAULTS, check, run
    out = o.get("out_dir", DEFAULTS["out_dir"])
    if o["pipeline"] != "eval":
        check(o["pipeline"] in PIPELINES, f"--pipeline={o['pipeline']} is unknown; do use default, long or eval")
        ar, tidar = PIPELINES[o["pipeline"]]
        rest = {"data_cache": f"{out}/data", **{k: v for k, v in o.items() if k not in ("pipeline", "out_dir")}}
        run({**ar, **rest, "mode": "ar", "out_dir": f"{out}/ar"})
        run({**tidar, **rest, "mode": "tidar", "init_from": f"{out}/ar/ckpt.pt", "out_dir": out})
    full = o["pipeline"] == "eval"                                 # the README's whole table, or a summary
    return decode_report(out, (4, 8, 16) if full else (16,), (1.0, 0.75, 0.5, 0.25) if full else (1.0, 0.5),
                         o.get("data", "stdlib"), LEVEL_SETTINGS if full else ["AR", "auto"])


def heldout_prompts(out, data, n_prompts):
    """The model in out/ckpt.pt and n 128-token prompts spread over the held-out split (val files, never trained on)."""
    from train import load_corpus
    model = Zaya.from_pretrained(os.path.join(out, "ckpt.pt")).eval()
    name = model.checkpoint_meta.get("tokenizer", "bytes")
    _, val = load_corpus(data, name, os.path.join(out, "data"), 129)
    return model, [torch.from_numpy(val[s:s + 128].astype("int64")) for s in
                   torch.linspace(0, len(val) - 129, n_prompts).long().tolist()]


@torch.no_grad()
def decode_report(out, blocks, weights, data, levels=(), n_prompts=8, new_tokens=96):
    """Tokens per forward and tokens/s of greedy AR, lossless (= mix at w = 1) and mix at each weight, on 128-token
    prompts from the held-out split (val files, never trained on), one at a time (batch 1); prints a table, a demo
    continuation of the first prompt by each sampler, and writes out/decode.json."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                  # batch-1 decoding: a second thread mostly adds noise on a shared CPU
    try:
        return _decode_report(out, blocks, weights, data, levels, n_prompts, new_tokens)
    finally:
        torch.set_num_threads(threads)


def _decode_report(out, blocks, weights, data, levels, n_prompts, new_tokens):
    from train import get_tokenizer
    model, prompts = heldout_prompts(out, data, n_prompts)
    enc, _ = get_tokenizer(model.checkpoint_meta.get("tokenizer", "bytes"))
    ar = [generate_ar(model, p[None], new_tokens)[1] for p in prompts]
    ar_tps = sum(s.tokens_per_s for s in ar) / len(ar)
    print(f"held-out decoding, {len(prompts)} prompts x {new_tokens} tokens, batch 1, greedy; AR {ar_tps:.1f} tokens/s")
    rows = []
    for K in blocks:
        for w in weights:
            st = [generate_tidar(model, p[None], new_tokens, sampler="mix", mix_weight=w, block_size=K)[1] for p in prompts]
            tpf, tps = (sum(getattr(s, a) for s in st) / len(st) for a in ("tokens_per_forward", "tokens_per_s"))
            rows.append(dict(block=K, w=w, tokens_per_forward=tpf, tokens_per_s=tps, speedup=tps / ar_tps))
            print(f"  block {K:2d} {'lossless' if w == 1 else f'mix w={w}':10s} {tpf:5.2f} tokens/forward, "
                  f"{tps:7.1f} tokens/s, {tps / ar_tps:.2f}x AR")
    if levels:                                           # proposal levels chosen per machine (levels.py)
        rows += levels_report(model, prompts, blocks[-1], new_tokens, levels, rounds=3 if len(levels) > 2 else 1)
        if len(levels) > 2:                              # block 4: steps cheap enough that some fixed sets beat AR
            rows += levels_report(model, prompts, 4, new_tokens, ["AR", "AR", None, [0], [0, 1], [0, 2], "auto"], 3)
    for name, kw in (("AR", None), ("lossless", dict(sampler="lossless")), ("mix 0.5", dict(sampler="mix"))):
        toks = (generate_ar(model, prompts[0][None], new_tokens) if kw is None else
                generate_tidar(model, prompts[0][None], new_tokens, block_size=blocks[-1], **kw))[0][0, len(prompts[0]):]
        print(f"--- {name} continuation of held-out code:\n{enc.decode([i for i in toks.tolist() if i < enc.n_vocab])}")
    acceptance = next((r["acceptance"] for r in rows if "acceptance" in r), None)
    Path(out, "decode.json").write_text(json.dumps(dict(ar_tokens_per_s=ar_tps, rows=rows, acceptance=acceptance)))
    return dict(ar_tokens_per_s=ar_tps, rows=rows, acceptance=acceptance)


HAND_SETS = [[0], [0, 1], [0, 2], [0, 4], [0, 8], [0, 2, 4], [0, 4, 8, 12]]   # fixed sets tried "by hand"
LEVEL_SETTINGS = ["AR", "AR"] + [None] + HAND_SETS + ["auto"]     # AR twice: the second shows this run's noise


def acceptance_from_histogram(hist, K):
    """Per-slot acceptance c[s] = P(draft s accepted | drafts 1..s-1 were) from a DENSE run's histogram of tokens
    committed per step (dense: every block starts at slot 1, so committing j + 1 means drafts 1..j accepted)."""
    reach = [sum(v for n, v in hist.items() if n - 1 >= j) for j in range(K)]   # steps with >= j drafts accepted
    return [0.0] + [reach[j] / reach[j - 1] if reach[j - 1] else 0.0 for j in range(1, K)] + [0.0]


def levels_report(model, prompts, K, new_tokens, settings, rounds=3, sampler="lossless", w=1.0):
    """Tokens/s of AR and TiDAR level settings ("AR", None = dense, a fixed list, "auto"), measured side by side:
    each round decodes every prompt with every setting, the order rotating per round, so a busy spell on this shared
    machine hits all settings alike. auto's latency calibration is done first (once per process) and timed apart.
    Prints a table with ratios to AR and to the best fixed set; returns rows (the dense row has the acceptance)."""
    from levels import calibrate
    curve = calibrate(model, 1, K, len(prompts[0]))
    generate_tidar(model, prompts[0][None], new_tokens, block_size=K, groups="auto", sampler=sampler, mix_weight=w)
    tot = {i: [0.0, 0, 0.0] for i in range(len(settings))}                 # seconds, tokens, sum of TPF
    hist, notes = {}, {}
    for r in range(rounds):
        for p in prompts:
            for i in [(j + r) % len(settings) for j in range(len(settings))]:
                g = settings[i]
                st = (generate_ar(model, p[None], new_tokens) if g == "AR" else generate_tidar(
                    model, p[None], new_tokens, block_size=K, groups=g, sampler=sampler, mix_weight=w))[1]
                tot[i] = [tot[i][0] + st.seconds, tot[i][1] + st.new_tokens, tot[i][2] + st.tokens_per_forward]
                notes[i] = st.note
                if g is None:
                    for n, v in st.histogram.items():
                        hist[n] = hist.get(n, 0) + v
    tps = {i: t[1] / t[0] for i, t in tot.items()}
    ar = next(tps[i] for i, g in enumerate(settings) if g == "AR")
    fixed = [i for i, g in enumerate(settings) if isinstance(g, list)]
    best = max(fixed, key=tps.get) if fixed else None
    name = lambda g: g if isinstance(g, str) else "dense" if g is None else "{" + ",".join(map(str, g)) + "}"
    names = [name(g) + (" again" if g == "AR" and settings.index(g) < i else "") for i, g in enumerate(settings)]
    print(f"  levels, block {K}, {sampler}{f' w={w}' if sampler == 'mix' else ''}: {rounds} rounds x {len(prompts)} "
          f"prompts x {new_tokens} tokens, settings interleaved; auto's calibration took {curve.seconds:.2f} s, once")
    rows = []
    for i, g in enumerate(settings):
        row = dict(block=K, w=w, groups=names[i], tokens_per_s=tps[i], tokens_per_forward=tot[i][2] / len(prompts) / rounds,
                   speedup=tps[i] / ar, vs_best_fixed=tps[i] / tps[best] if fixed else None, note=notes[i])
        if g is None:
            row["acceptance"] = acceptance_from_histogram(hist, K)
        rows.append(row)
        print(f"    {names[i]:12s} {row['tokens_per_forward']:5.2f} tokens/forward {tps[i]:8.1f} tokens/s "
              f"{tps[i] / ar:5.2f}x AR" + (f" {tps[i] / tps[best]:5.2f}x best fixed" if fixed else "")
              + (" (best fixed)" if i == best else "") + (f"  [{notes[i]}]" if notes[i] else ""))
    return rows


def dry_run(c):
    """Parameters, memory per GPU under FSDP, training FLOPs. Bytes for N params, G GPUs, t = batch_size T tokens
    per GPU (T = S for AR, 2S for TiDAR): states 16 N / G (fp32 weights + grads, AdamW m, v; sharded); gathered bf16
    2 (2 N_layer + V d) (layer in use + prefetched + embedding); activations t (4 L d + a) (fp32 residual per layer,
    a = 2 (16 d + 6 (nq+nkv) hd + 4 I) for one recomputed layer, L of them without grad_checkpointing) + 12 V per
    loss_chunk token + T^2 (mask). FLOPs per data token: 6 (N_active + V d) per forwarded token (T / S of them) +
    12 L nq hd per attended key (AR S/2; TiDAR S/2 clean + S/2 + K/2 masked: the pairs its mask allows)."""
    cfg = ZayaConfig.from_name(c.preset, block_size=c.block_size)
    with torch.device("meta"):
        model = Zaya(cfg)
    N, Na = model.num_params(), model.num_params(active=True)
    L, d, V, I, S = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.moe_intermediate_size, c.seq_len
    C, A = (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim, cfg.num_attention_heads * cfg.head_dim
    states, gathered, GiB = 16 * N / c.gpus, 2 * (2 * (N - V * d) / L + V * d), 2**30
    print(f"{c.preset}: {N:,} parameters, {Na:,} active per token (one expert, embedding excluded)\n"
          f"per GPU, FSDP over {c.gpus} GPUs, batch_size {c.batch_size}, seq_len {S}, grad_checkpointing="
          f"{c.grad_checkpointing}, loss_chunk {c.loss_chunk}: states 16 N / G = {states / GiB:.1f} GiB, "
          f"gathered bf16 = {gathered / GiB:.1f} GiB (formulas: bench.dry_run.__doc__)")
    for mode, T, keys in (("AR", S, S / 2), ("TiDAR", 2 * S, S + c.block_size / 2)):
        t = c.batch_size * T
        act = t * (4 * L * d + 2 * (16 * d + 6 * C + 4 * I) * (1 if c.grad_checkpointing else L))
        act += 12 * min(c.loss_chunk or t, t) * V + T * T
        flops = T // S * 6 * (Na + V * d) + 12 * L * A * keys
        print(f"  {mode:5s} T={T}: activations {act / GiB:.1f} GiB, total {(states + gathered + act) / GiB:.1f} GiB; "
              f"training FLOPs per data token {flops / 1e9:.2f} GFLOP")
    return dict(params=N, active=Na)


def main(argv=None):
    import kernels                                                  # torch.compile machinery: only when used
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", default=None, help="a checkpoint for the TiDAR/AR part (default: a random model)")
    p.add_argument("--config", default="small", help="preset of the random model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prefix", type=int, default=256)
    p.add_argument("--train_batch", type=int, default=4)
    p.add_argument("--train_len", type=int, default=256)
    p.add_argument("--gpu8b", action="store_true", help="only the 8B-shaped latency curve and decode (needs CUDA)")
    p.add_argument("--gpu8b_config", default="zaya1-8b", help="preset for --gpu8b ('tiny' tests it on a CPU)")
    p.add_argument("--query_tokens", type=int, nargs="*", help="extra T for the --gpu8b curve")
    p.add_argument("--tpf", type=float, default=3.0, help="tokens per forward for the implied speedup")
    p.add_argument("--acceptance", default="out/decode.json", help="--gpu8b: per-slot acceptance from a reproduction")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 16], help="--gpu8b: batch sizes for the level sets")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--levels", action="store_true", help="only AR vs TiDAR level sets vs auto on --init_from's model")
    p.add_argument("--data", default="stdlib", help="the corpus whose held-out split gives --levels its prompts")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(a.threads or torch.get_num_threads())
    if a.levels:                                                       # python bench.py --levels --init_from=out
        model, prompts = heldout_prompts(a.init_from or "out", a.data, 8)
        with torch.no_grad():
            return levels_report(model, prompts, model.config.block_size, a.new_tokens, LEVEL_SETTINGS,
                                 a.reps)
    if a.gpu8b:
        return gpu8b(a)
    device = torch.device(a.device)
    model = random_model(ZayaConfig.from_name(a.config), torch.float32, device)
    say(f"random '{a.config}' model: parameters ({device.type}, fp32, {torch.get_num_threads()} threads)",
        model.num_params() / 1e6, "M", f"{model.num_params(active=True) / 1e6:.2f} M active; load average "
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
