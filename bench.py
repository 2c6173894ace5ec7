"""
Benchmarks, one line per measurement, every ratio of numbers measured side by side in this run:
- every row on one model's weights (--init_from's, else a random --config one): ours vs
  transformers' ZayaForCausalLM, AR decode tok/s (batch 1, greedy; eager and compiled:
  kernels.enable) and training tok/s (our AR and TiDAR steps vs its AR step; a step: forward,
  loss, backward, AdamW at lr 0); TiDAR (lossless, mix 0.5, auto) vs our AR (tok/s, tokens per
  forward: TPF); forward latency vs query tokens T;
- --roofline: TiDAR's speedup over AR predicted on GPUs for the 8B's shape (levels.gpu_prediction:
  the step-cost model of docs/tidar.md section 6), at the acceptance measured (--acceptance) and the
  anchors'. AR vs TiDAR as a user runs it on held-out code: python train.py's report.
Random weights' tokens mean nothing: their speeds and TPF are only this code's.
"""
import argparse
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

import kernels
from levels import (LatencyCurve, constant_acceptance, gpu_prediction, level_rate, median_seconds,
                    step_cost)
from sample import generate_ar, generate_tidar
from train import DEFAULTS, TrainLoss
from zaya import Zaya, ZayaConfig

FLAGS = [  # (flag, type, default, help); type bool: a switch; a list default: nargs="*"
    ("init_from", str, None, "a checkpoint for the TiDAR/AR part (default: a random model)"),
    ("config", str, "small", "random model's preset"), ("threads", int, 0, "CPUs (0: torch's)"),
    ("device", str, "cuda" if torch.cuda.is_available() else "cpu", None),
    ("compile", lambda s: s.lower() in ("1", "true", "yes"), True, None),
    ("prompt_len", int, 32, None), ("new_tokens", int, 128, None), ("reps", int, 3, None),
    ("prefix", int, 256, None), ("train_batch", int, 4, None), ("train_len", int, 256, None),
    ("tpf", float, 3.0, "--roofline: the dense TPF without --acceptance"),
    ("acceptance", str, "out/decode.json", "--roofline: per-slot acceptance measured"),
    ("roofline", bool, False, "only predicted speedups on GPUs (no weights)")]


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
    t_ref = median_seconds(gen, a.reps, a.device)
    say("AR decode, transformers ZayaForCausalLM.generate", n / t_ref, "tok/s")
    ours = generate_ar(model, x, n)[0]
    t = {}                                                      # path -> seconds
    for tag in paths(a, model):                 # eager: vs the reference's tokens; compiled: ours
        t[tag] = median_seconds(lambda: generate_ar(model, x, n), a.reps, a.device)
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
    return median_seconds(step, a.reps, a.device)


def latency_curve(a, model, tag, Ts, note=lambda T: ""):
    """{T: median seconds of a T-token forward (a verify/draft pass) after a.prefix cached tokens}:
    levels.LatencyCurve at batch 1, a.reps runs; note(T) ends each line."""
    out = LatencyCurve(model, 1, model.config.block_size, a.prefix, a.reps)
    for T in Ts:
        say(f"forward latency {tag}, prefix {a.prefix}, T={T}", out[T] * 1e3, "ms",
            f"{out[T] / out[Ts[0]]:.2f}x T=1{note(T)}")
    return out


def load_acceptance(path, K, tpf):
    """Per-slot acceptance from a report's decode.json (its dense lossless run), else a constant one
    whose dense tokens per forward is `tpf` (random weights accept nothing)."""
    acc = os.path.exists(path) and json.loads(Path(path).read_text()).get("acceptance")
    acc = acc if acc and len(acc) == K + 1 else constant_acceptance(K, tpf)
    dense = level_rate(list(range(K)), acc, K)
    print(f"per-slot acceptance (decode.json: {path}, else constant): dense TPF {dense:.2f}")
    return acc


def roofline(a):
    """--roofline: levels.gpu_prediction for the 8B's shape at 4k and 32k cached tokens, at the
    acceptance measured (load_acceptance) and the anchors' (constant: dense TPF 8.25, TiDAR 8B's,
    docs/tidar.md section 5); then the bytes a step reads."""
    K = ZayaConfig.from_name("zaya1-8b").block_size
    cost = step_cost(ZayaConfig.from_name("zaya1-8b"))
    for name, acc in (("measured", load_acceptance(a.acceptance, K, a.tpf)),
                      ("anchor", constant_acceptance(K, 8.25))):
        for ctx in (4096, 32768):
            print(f"{name} acceptance, {ctx // 1024}k context:")
            gpu_prediction(acc, K, (1, 4, 16, 64), ctx)

    def gb(n, ctx=4096):
        return f"{cost(1, n, ctx)[0] / 1e9:.2f} GB"
    print(f"bytes per step, batch 1, 4k: AR {gb(1)} ({gb(1, 0)} without the cache), {2 * K} tokens "
          f"{gb(2 * K)}, {K * (1 + K)} tokens {gb(K * (1 + K))} (docs/tidar.md: ~2.6, 16-17.7 GB)")


def decode_rows(a, model, tag):
    """AR, then TiDAR lossless, mix 0.5 and auto on one random prompt; then the forward latency
    curve (compiled: the graphed T only)."""
    x = tokens(model.config, (1, a.prompt_len), model.embed_tokens.weight.device)
    n = a.new_tokens
    K = model.config.block_size
    t_ar = median_seconds(lambda: generate_ar(model, x, n), a.reps, a.device)
    say(f"AR decode {tag}", n / t_ar, "tok/s", "1.00 tokens/forward")
    runs = {"lossless": {}, "mix": dict(sampler="mix"), "auto": dict(groups="auto")}
    for name, kw in runs.items():
        tpf = generate_tidar(model, x, n, **kw)[1].tokens_per_forward
        t = median_seconds(lambda: generate_tidar(model, x, n, **kw), a.reps, a.device)
        say(f"TiDAR {name} (K={K}) {tag}", n / t, "tok/s",
            f"{tpf:.2f} tokens/forward, {t_ar / t:.2f}x AR")
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
    if a.roofline:
        return roofline(a)
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
