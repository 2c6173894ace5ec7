"""
Train ZAYA1 (zaya.py) on text: autoregressive pre-training, or TiDAR conversion of an AR checkpoint.

  python train.py                    # the reproduction (--pipeline=default): the bundled base
                                     # converted, then reported beside the bundled conversion
  python train.py --pipeline=convert --init_from=out/ar/ckpt.pt --out_dir=out-conv
  python train.py --mode=ar --preset=tiny --max_iters=300          # one AR run, ~15 s on a CPU
  torchrun --nproc_per_node=8 train.py --mode=ar --preset=medium   # DDP; add --fsdp=True for FSDP2
  python train.py --preset=zaya1-8b --dry_run=True --gpus=64  # params, memory, FLOPs; no allocation

Without --mode (or --dry_run, --export, --init_from=resume) train.py runs a pipeline (reproduce),
and every flag reaches each of its stages. TiDAR's layout, mask, labels and loss: docs/tidar.md
sections 1-2 (zaya.tidar_train_layout, tidar_loss); the recipe shaping it for acceptance:
docs/acceptance.md. MoE balance without an auxiliary loss (DeepSeek-V3, arXiv 2412.19437 section
2.1.2): update_balancing_biases.
"""
import functools
import gc
import json
import math
import os
import resource
import shutil
import signal
import sys
import sysconfig
import threading
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from cli import UsageError, check, get_tokenizer, load_tokenizer, parse_args
from sample import DRAFT_SCALE, LEVEL_RUNS, SPEED_RUNS, decode_report, generate_ar
from zaya import (CheckpointError, Zaya, ZayaConfig, _atomic_write, causal_layout, check_tensors,
                  latest_checkpoint, load_checkpoint, save_hf, tidar_train_layout)

# -----------------------------------------------------------------------------
# settings: every key can be overridden with --key=value (parsed to the default's type)
DEFAULTS = dict(
    preset="tiny",                 # zaya.PRESETS name
    mode="ar",                     # ar: next-token loss | tidar: AR + diffusion (docs/tidar.md 1)
    init_from="scratch",           # scratch | resume (out_dir) | PATH: ckpt.pt, its dir, an HF dir
    data="stdlib",                 # stdlib (this Python's .py files) | PATH: a text file or folder
    tokenizer="bytes",             # bytes | bpeN: a BPE of N ids trained on --data | PATH
    out_dir="out", data_cache="",  # token cache folder ("" = out_dir/data)
    max_iters=300, batch_size=16, seq_len=128, block_size=16, alpha=1.0,
    # conversion shaped for acceptance (docs/acceptance.md); these defaults are the paper's loss
    distill=0.0,                   # + distill * batch_size windows of the AR teacher's own text
    distill_from="", distill_rows=1024, distill_prompt=64, distill_len=256, distill_temp=0.0,
    real_diffusion=True,           # diffusion loss on the real windows too (False: distilled)
    pos_decay=0.0, slot0=1.0,      # block slot k>=1 weighs exp(-(k-1)/pos_decay) (0: 1), 0 slot0
    kl=0.0, tv=0.0,                # soft targets p: kl CE(p) + (1-kl) CE(x_i); + tv TV(p, draft)
    lr=3e-3, min_lr=3e-4, warmup_iters=20, lr_decay_iters=0, weight_decay=0.1, grad_clip=1.0,
    bias_update_rate=1e-3, eval_interval=100, eval_iters=4, log_interval=20, seed=1337,
    device="auto", dtype="auto",   # auto: cuda + bfloat16 autocast given a GPU, else cpu + float32
    compile=False, grad_checkpointing=False, fsdp=False,
    loss_chunk=1024,               # tokens per cross-entropy chunk (0 = one chunk, full logits)
    pipeline="default",            # default|long|convert|eval|ablation (without --mode)
    draft_scale=DRAFT_SCALE,       # the report's T=1 rows draw drafts at T / draft_scale
    export="",                     # DIR: export --init_from in the HF layout, exit
    dry_run=False, gpus=8)         # dry_run: print sizes for --gpus GPUs and exit


class Interrupted(Exception):
    """Ctrl-C: the run saved its checkpoint after the current step and stops (status 130)."""


class Diverged(Exception):
    """A non-finite loss or gradient: the run stops (status 1); the last good checkpoint stays."""


# -----------------------------------------------------------------------------
# data (the tokenizers and the flag parser live in cli.py, which both CLIs share)
def corpus_files(data):
    """Sorted (relative path, path): Python's stdlib .py files (no test dirs, no site-packages), one
    file, or every file under a folder (hidden entries skipped; binary files dropped when read)."""
    check(data == "stdlib" or os.path.exists(data),
          f"--data={data} does not exist; do pass a text file or a folder")
    if data != "stdlib" and os.path.isfile(data):
        return [(os.path.basename(data), data)]
    root, ext = (sysconfig.get_paths()["stdlib"], ".py") if data == "stdlib" else (data, "")
    skip = ({"site-packages", "dist-packages", "test", "tests", "idle_test"} if data == "stdlib"
            else set())
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip and not x.startswith(".")]
        files += [(os.path.relpath(os.path.join(d, f), root), os.path.join(d, f))
                  for f in names if f.endswith(ext) and not f.startswith(".")]
    return sorted(files)


def split_texts(data):
    """(train, val): the documents of `data`, a file held out (val) when crc32 of its relative path
    % 20 == 0 (~5% of them, never trained on); binary files (NUL bytes) dropped."""
    docs = ([], [])
    for rel, p in corpus_files(data):
        raw = Path(p).read_bytes()
        if raw and b"\0" not in raw[:8192]:
            docs[zlib.crc32(rel.encode()) % 20 == 0].append(raw.decode(errors="replace"))
    return docs


BPE_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]   # ids 0-4, as in ZAYA1's


def bpe_tokenizer(c):
    """--tokenizer=bpeN: the path of a byte-level BPE tokenizer.json of N ids, trained on the
    training split of --data only (the `tokenizers` package), once, and kept in the data cache.
    Its first ids are BPE_SPECIAL_TOKENS: <pad> 0, <bos> 2 and <mask> 4 as in ZAYA1's tokenizer;
    <eos> 1 ends every document."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    n = int(c.tokenizer[3:])
    check(256 + len(BPE_SPECIAL_TOKENS) <= n <= 2**16,
          f"--tokenizer={c.tokenizer}: do pick between bpe261 and bpe65536")
    files = [(rel, os.path.getsize(p)) for rel, p in corpus_files(c.data)]
    where = c.data if c.data == "stdlib" else os.path.abspath(c.data)
    key = zlib.crc32(json.dumps([where, n, files]).encode())
    cache = c.data_cache or f"{c.out_dir}/data"
    path = os.path.abspath(os.path.join(cache, f"bpe{n}-{key:08x}.json"))
    if not os.path.exists(path):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=n, special_tokens=BPE_SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(split_texts(c.data)[0], trainer)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _atomic_write(path, tok.save)
    return path


def load_corpus(data, tokenizer, cache_dir, min_tokens=2):
    """(train, val) token arrays (memmaps) of split_texts' documents, each <|endoftext|> then its
    tokens. Cached as uint16 (uint32 for big vocabs) .bin files keyed by the data path, file sizes
    and times, and the tokenizer. A split under min_tokens: the last 5% of all become val."""
    files = corpus_files(data)
    stat = [data if data == "stdlib" else os.path.abspath(data), tokenizer]   # cwd-free key
    stat += [(rel, os.path.getsize(p), os.path.getmtime(p)) for rel, p in files]
    stat += [os.path.getmtime(tokenizer)] if os.path.exists(tokenizer) else []   # a tokenizer.json
    key = f"{Path(tokenizer).stem}-{zlib.crc32(json.dumps(stat).encode()):08x}"
    enc, ids = get_tokenizer(tokenizer)
    dtype = np.uint16 if ids["vocab_size"] <= 2**16 else np.uint32
    paths = [os.path.join(cache_dir, f"{key}.{split}.bin") for split in ("train", "val")]
    if not all(os.path.exists(p) for p in paths):
        os.makedirs(cache_dir, exist_ok=True)
        for path, texts in zip(paths, split_texts(data)):  # atomic: ranks may both write
            toks = [t for doc in enc.encode_ordinary_batch(texts) for t in [ids["eot"], *doc]]
            _atomic_write(path, np.array(toks, dtype=dtype).tofile)
    train, val = (np.memmap(p, dtype=dtype, mode="r") if os.path.getsize(p) else np.zeros(0, dtype)
                  for p in paths)
    if len(train) < min_tokens or len(val) < min_tokens:
        every = np.concatenate([train, val])
        n_val = max(len(every) // 20, min_tokens)
        check(len(every) - n_val >= min_tokens,
              f"--data={data}: {len(every)} tokens, fewer than seq_len+1 = {min_tokens} per split; "
              "do add text or shorten --seq_len")
        train, val = every[:-n_val], every[-n_val:]
    return train, val


def get_batch(ids, batch_size, seq_len, gen=None, rank=0, world=1, device="cpu"):
    """Random windows [batch_size, seq_len+1] (int64) of ids [N], or within the rows of ids [R, L].
    Every rank draws the same global batch of batch_size * world windows (same seed, gen or torch's
    global RNG) and keeps its slice: the global batch ignores the process count."""
    L = ids.shape[-1]
    n = L - seq_len                                                 # window starts per row
    ix = torch.randint(n * (ids.size // L), (batch_size * world,), generator=gen)
    ix = ix[rank * batch_size:][:batch_size].tolist()
    flat = ids.reshape(-1)
    w = torch.from_numpy(np.stack([flat[i // n * L + i % n:][:seq_len + 1].astype(np.int64)
                                   for i in ix]))
    return w.pin_memory().to(device, non_blocking=True) if "cuda" in str(device) else w


@torch.no_grad()
def distill_corpus(c, train_ids, cache_dir, rank=0, device="cpu"):
    """Self-distillation (docs/acceptance.md): the teacher c.distill_from continues distill_rows
    training-split prompts (seed c.seed + 2) to distill_len tokens at distill_temp (0: greedy),
    batched on the static cache -> [rows, distill_len] array; cached in cache_dir by rank 0."""
    src = os.path.isdir(c.distill_from) and latest_checkpoint(c.distill_from) or c.distill_from
    key = [os.path.abspath(src), os.path.getsize(src), os.path.getmtime(src), len(train_ids),
           c.distill_rows, c.distill_prompt, c.distill_len, c.distill_temp, c.seed]
    path = os.path.join(cache_dir, f"distill-{zlib.crc32(json.dumps(key).encode()):08x}.bin")
    if rank == 0 and not os.path.exists(path):
        t0 = time.time()
        teacher = Zaya.from_pretrained(c.distill_from, dtype=torch.float32).to(device).eval()
        gen = torch.Generator().manual_seed(c.seed + 2)
        starts = torch.randint(len(train_ids) - c.distill_prompt, (c.distill_rows,), generator=gen)
        rows = []
        for part in starts.split(256):                              # 256 prompts per batch
            x = torch.from_numpy(np.stack([train_ids[i:i + c.distill_prompt].astype(np.int64)
                                           for i in part.tolist()])).to(device)
            rows.append(generate_ar(teacher, x, c.distill_len - c.distill_prompt, c.distill_temp,
                                    generator=gen)[0].cpu())
        os.makedirs(cache_dir, exist_ok=True)
        _atomic_write(path, np.concatenate(rows).astype(train_ids.dtype).tofile)
        print(f"distilled {c.distill_rows:,} x {c.distill_len} tokens from {c.distill_from} "
              f"in {time.time() - t0:.0f} s")
    if dist.is_initialized():
        dist.barrier()
    return np.fromfile(path, dtype=train_ids.dtype).reshape(c.distill_rows, c.distill_len)


# -----------------------------------------------------------------------------
# losses and load balancing
def chunked_cross_entropy(h, weight, targets, chunk=0, token_weight=None, teacher=None, kl=0, tv=0):
    """Mean CE of F.linear(h, weight) against targets (-1 ignored) and per-token top-1 hits, `chunk`
    tokens at a time under activation checkpointing: backward recomputes a chunk's logits, so no
    (N, V) logits ever exist (at V = 262k a 1024-token chunk is 1 GiB in fp32). chunk = 0: one
    chunk, no recomputation. Optional, per token: token_weight (a weighted mean) and soft targets
    p = softmax(teacher @ weight^T) (no gradient): (1 - kl) CE(y) + kl CE(p) + tv (1 - sum min(p,
    q)), q = softmax(logits): TV(p, q), speculative sampling's rejection odds (arXiv 2310.08461)."""
    def ce(h, y, wt, t, kl, tv):
        logits = F.linear(h, weight)                                # (n, V), this chunk only
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(logits, y, ignore_index=-1, reduction="none")
        if t is not None:
            p = F.linear(t, weight.detach()).to(logits.dtype).softmax(-1)
            loss = (1 - kl) * loss - kl * (p * logits.log_softmax(-1)).sum(-1) * (y != -1)
            loss = loss + tv * (1 - torch.minimum(p, logits.softmax(-1)).sum(-1)) * (y != -1)
        return (loss * wt).sum(), logits.argmax(-1) == y
    d = h.shape[-1]
    y = targets.reshape(-1)                                         # (N,)
    wt = torch.ones(len(y), device=h.device) if token_weight is None else token_weight.reshape(-1)
    wt = wt * (y != -1)
    kl, tv = (torch.as_tensor(x).to(h).expand_as(targets).reshape(-1) for x in (kl, tv))
    t = teacher.detach().reshape(-1, d) if teacher is not None else None
    chunk = chunk or len(y)
    total = 0.0
    hits = []
    for i in range(0, len(y), chunk):
        j = slice(i, i + chunk)
        args = (h.reshape(-1, d)[j], y[j], wt[j], None if t is None else t[j], kl[j], tv[j])
        recompute = torch.is_grad_enabled() and chunk < len(y)
        s, hit = grad_checkpoint(ce, *args, use_reentrant=False) if recompute else ce(*args)
        total = total + s
        hits.append(hit)
    return total / wt.sum().clamp_min(1e-9), torch.cat(hits)


def tidar_loss(model, w, c, real=None):
    """TiDAR loss (docs/tidar.md 1) on windows w [B, S+1] -> (loss, ar, diff, hits [B, S] of the
    diffusion argmax). One forward over [x_0..x_{S-1} | S masks]; the (S+1)-token window gives every
    clean position a label. Shaped by c (docs/acceptance.md): rows from `real` on are self-distilled
    (no AR loss: Medusa-2's warning); block slot k weighs slot0 (k = 0) or exp(-(k-1)/pos_decay); kl
    and tv add soft targets: the AR head's p(x_i | x_<i) at clean position i-1 of this forward."""
    B = w.shape[0]
    S = w.shape[1] - 1                                            # inputs per window
    K = c.block_size
    idx = w[:, :S]
    pos, pred, mask = tidar_train_layout(S, K, w.device)          # docs/tidar.md 1-2
    x = torch.cat([idx, torch.full_like(idx, model.config.mask_token_id)], 1)    # [idx | S masks]
    h = model.forward_hidden(x, pos, pred, mask)                  # (B, 2S, d)
    weight = model.embed_tokens.weight                            # the tied lm_head
    y = w[:, 1:].clone()
    if real is not None:
        y[real:] = -1                                             # AR learns from real text only
    ar = chunked_cross_entropy(h[:, :S], weight, y, c.loss_chunk)[0] if real != 0 else 0 * h.sum()
    i = torch.arange(S, device=w.device)
    slot = (i % K).double()
    pw = (torch.exp(-(slot - 1) / c.pos_decay) if c.pos_decay else torch.ones_like(slot))
    pw = torch.where(slot == 0, c.slot0, pw).to(h.dtype).expand(B, S)
    teacher = torch.cat([h[:, :1], h[:, :S - 1]], 1) if c.kl or c.tv else None  # clean i-1: x_i
    diff, hits = chunked_cross_entropy(h[:, S:], weight, idx, c.loss_chunk, pw, teacher,
                                       c.kl * (i > 0), c.tv * (i > 0))  # mask i -> x_i
    return (c.alpha * ar + diff) / (1 + c.alpha), ar, diff, hits.view(B, S)


class TrainLoss(nn.Module):
    """The loss as the module DDP / FSDP wrap: their hooks see every weight use (tied head too)."""

    def __init__(self, model, c):
        super().__init__()
        self.model, self.c = model, c

    def forward(self, w, extra=None):
        """Real windows w [B, S+1], distilled ones extra [D, S+1] or None -> (loss, ar, diff, hits)
        ((loss, loss, None, None) for AR). real_diffusion=False: real rows run causally (the same
        AR loss at half the tokens) and only the distilled rows get the diffusion loss."""
        c, m = self.c, self.model
        S = w.shape[1] - 1
        if c.mode == "tidar" and (c.real_diffusion or extra is None):
            return tidar_loss(m, w if extra is None else torch.cat([w, extra]), c, len(w))
        h = m.forward_hidden(w[:, :S], *causal_layout(S, w.device))
        ar, _ = chunked_cross_entropy(h, m.embed_tokens.weight, w[:, 1:], c.loss_chunk)
        if c.mode == "ar":
            return ar, ar, None, None
        _, _, diff, hits = tidar_loss(m, extra, c, 0)
        return (c.alpha * ar + diff) / (1 + c.alpha), ar, diff, hits


@torch.no_grad()
def update_balancing_biases(model, rate):
    """Aux-loss-free load balancing, DeepSeek-V3's sign rule, after every optimizer step. For each
    MoE layer, with load_e = tokens routed to expert e in this step (summed over ranks) and mean =
    the mean over experts:
        b_e <- b_e + rate * sign(mean - load_e)      for e < E;
    the skip class b_E (= -1) is never touched. The biases only move the argmax (zaya.Router), not
    the gate weight: no gradient. Returns the imbalance max_e load_e / mean, layer-averaged."""
    moes = [layer.mlp for layer in model.layers]
    loads = torch.stack([m.load[:-1] for m in moes]).float()      # (L, E)
    if dist.is_initialized():
        dist.all_reduce(loads)
    mean = loads.mean(1, keepdim=True)
    for m, step in zip(moes, rate * torch.sign(mean - loads)):
        m.gate.balancing_biases[:-1] += step.to(m.gate.balancing_biases.device)
    return (loads.max(1).values / mean[:, 0].clamp_min(1e-9)).mean().item()


def get_lr(it, c):
    """Linear warmup to lr, then cosine down to min_lr at lr_decay_iters (0 = max_iters)."""
    if it < c.warmup_iters:
        return c.lr * (it + 1) / (c.warmup_iters + 1)
    ratio = min(1.0, (it - c.warmup_iters)
                / max(1, (c.lr_decay_iters or c.max_iters) - c.warmup_iters))
    return c.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (c.lr - c.min_lr)


def all_mean(x):
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


# -----------------------------------------------------------------------------
# one training run, in stages: settings, processes, data, model, resume, the loop
def run(overrides):
    """One run (ar or tidar). Returns a summary dict, also written to out_dir/log.json."""
    c, src, ckpt = settings(overrides)
    if c.dry_run:
        return dry_run(c)
    if c.export:
        return export(c, src)
    proc = processes(c)
    data = load_data(c, proc)
    job = build(c, proc, data, ckpt, src)
    job.it = 0
    job.best = float("inf")
    if c.init_from == "resume":
        restore(job, ckpt.meta)
    proc.log(f"{c.mode} from {c.init_from}: {job.model.num_params():,} params, {proc.world} "
             f"process(es), {proc.device}, {proc.dtype}")
    return train_loop(c, proc, data, job)


def settings(overrides):
    """DEFAULTS <- the checkpoint's settings on resume, or its tokenizer on init <- overrides;
    checked. Returns (c, the checkpoint's path, the checkpoint: config, parts, meta; or None)."""
    src = overrides.get("init_from", "scratch")
    if src == "resume":
        out = overrides.get("out_dir", DEFAULTS["out_dir"])
        src = latest_checkpoint(out)                                # ckpt.pt or a DCP folder
        check(src, f"no checkpoint to resume in {out}; do pass the run's --out_dir")
    ckpt = None
    base = {}                                                       # what the checkpoint sets
    if src != "scratch":
        try:
            config, parts, meta = load_checkpoint(src)
        except CheckpointError as e:
            raise UsageError(f"{e}; do pass a train.py checkpoint or out_dir (python train.py "
                             "makes one), or a Hugging Face directory") from None
        ckpt = SimpleNamespace(config=config, parts=parts, meta=meta)
        hf_tok = os.path.isfile(os.path.join(src, "tokenizer.json"))   # an HF dir's own tokenizer
        if overrides.get("init_from") == "resume":
            base = {k: v for k, v in meta["train_cfg"].items() if k in DEFAULTS and k != "fsdp"}
        elif "tokenizer" in meta:
            base = {"tokenizer": meta["tokenizer"]}
        elif hf_tok:
            base = {"tokenizer": os.path.abspath(src)}
    c = SimpleNamespace(**{**DEFAULTS, **base, **overrides})
    if c.tokenizer != "bytes" and os.path.exists(c.tokenizer):  # an HF tokenizer: any cwd
        c.tokenizer = os.path.abspath(c.tokenizer)
    check(c.mode in ("ar", "tidar"), f"--mode={c.mode} is unknown; do use ar or tidar")
    check(c.dtype in ("auto", "float32", "bfloat16"),
          f"--dtype={c.dtype} is unknown; do use auto, float32 or bfloat16")
    for k, v in vars(c).items():  # sizes and intervals >= 1, other numbers >= 0
        lo = int(k in ("batch_size", "seq_len", "block_size", "eval_interval", "eval_iters",
                       "log_interval", "gpus"))
        check(type(v) not in (int, float) or v >= lo,
              f"--{k}={v} must be >= {lo}; do pass a value >= {lo}")
    check(c.mode == "ar" or c.seq_len % c.block_size == 0,
          f"--seq_len={c.seq_len} is not a multiple of --block_size={c.block_size}; do make it "
          f"one, e.g. --seq_len={max(1, c.seq_len // c.block_size) * c.block_size}")
    check(c.kl <= 1, f"--kl={c.kl} mixes two losses; do pass a weight in [0, 1]")
    return c, src, ckpt


def processes(c):
    """This process's rank, device and precision; the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = c.device if c.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    check(not cuda or torch.cuda.is_available(),
          f"--device={device} but CUDA is not available; do use --device=cpu")
    check(not c.fsdp or world > 1,
          "--fsdp=True needs several processes; do launch with torchrun --nproc_per_node=N")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{local}" if world > 1 else device
        torch.cuda.set_device(device)
    dtype = c.dtype if c.dtype != "auto" else "bfloat16" if cuda else "float32"
    autocast = torch.autocast("cuda" if cuda else "cpu", torch.bfloat16,
                              enabled=dtype == "bfloat16")
    os.makedirs(c.out_dir, exist_ok=True)
    torch.manual_seed(c.seed)                  # the only RNG training draws from (get_batch)
    return SimpleNamespace(world=world, rank=rank, device=device, cuda=cuda, dtype=dtype,
                           autocast=autocast, log=print if rank == 0 else lambda *a: None)


def load_data(c, proc):
    """Tokenizer, train and val token arrays, and the self-distilled rows (or None); a cold cache is
    built by every rank (the writes are atomic)."""
    if c.tokenizer.startswith("bpe") and c.tokenizer[3:].isdigit():
        c.tokenizer = bpe_tokenizer(c)                  # kept in the checkpoint: the file's path
    enc, ids = get_tokenizer(c.tokenizer)
    cache = c.data_cache or f"{c.out_dir}/data"
    train_ids, val_ids = load_corpus(c.data, c.tokenizer, cache, c.seq_len + 1)
    proc.log(f"data {c.data}: {len(train_ids):,} train / {len(val_ids):,} val tokens "
             f"({c.tokenizer})")
    extra = round(c.distill * c.batch_size) if c.mode == "tidar" else 0  # distilled rows a batch
    check(c.real_diffusion or extra or c.mode == "ar", "--real_diffusion=False trains no "
          "diffusion without distilled rows; do pass --distill > 0 (or use --mode=ar)")
    distilled = None
    if extra:
        c.distill_from = c.distill_from or c.init_from              # kept for resume
        check(os.path.exists(c.distill_from), f"--distill_from={c.distill_from} is no checkpoint;"
              " do pass the AR checkpoint to distill (by default --init_from)")
        check(c.distill_len > c.seq_len and 0 < c.distill_prompt < c.distill_len, f"--distill_len="
              f"{c.distill_len} must exceed --seq_len and --distill_prompt; do raise it")
        distilled = distill_corpus(c, train_ids, cache, proc.rank, proc.device)
    return SimpleNamespace(enc=enc, ids=ids, train=train_ids, val=val_ids, distilled=distilled,
                           extra=extra)


def new_model(c, data, ckpt):
    """From scratch: the preset, initialised (alike on every rank). From a checkpoint: its config,
    on the meta device (build fills it), the block size and mask id of this run."""
    mask = data.ids["mask"]                              # the tokenizer's, else the checkpoint's
    if ckpt is None:
        return Zaya(ZayaConfig.from_name(
            c.preset, vocab_size=data.ids["vocab_size"], bos_token_id=data.ids["eot"],
            eos_token_id=data.ids["eot"], pad_token_id=data.ids["pad"], mask_token_id=mask,
            block_size=c.block_size))
    config = ckpt.config
    config.block_size = c.block_size
    if c.init_from != "resume" and mask is not None:
        config.mask_token_id = mask
    with torch.device("meta"):
        return Zaya(config)


def build(c, proc, data, ckpt, src):
    """The model (sharded under FSDP2: from a checkpoint each rank reads only the rows it owns), the
    loss module DDP/FSDP wrap, AdamW. Returns the job: model, loss_model, opt, params."""
    model = new_model(c, data, ckpt)
    if ckpt is not None:
        check_tensors(src, model.state_dict(), ckpt.parts)
    check(data.enc.n_vocab <= model.config.vocab_size,
          f"tokenizer {c.tokenizer} has {data.enc.n_vocab} ids but the model's vocab_size is "
          f"{model.config.vocab_size}; do use the tokenizer the checkpoint was trained with")
    check(c.seq_len <= model.config.max_position_embeddings,
          f"--seq_len={c.seq_len} is longer than the model's context (max_position_embeddings="
          f"{model.config.max_position_embeddings}); do pass a shorter --seq_len")
    check(c.mode == "ar" or model.config.mask_token_id is not None, f"no mask id in {c.tokenizer}"
          " or config.json; do add <mask> to the tokenizer or mask_token_id to config.json")
    model.grad_checkpointing = c.grad_checkpointing
    loss_model = TrainLoss(model, c)
    if c.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(torch.bfloat16 if proc.dtype == "bfloat16" else None,
                                  reduce_dtype=torch.float32)
        for layer in model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(loss_model, mp_policy=mp)
    if ckpt is None:
        model.to(proc.device)
    else:
        model.to_empty(device=proc.device)
    dcp_resume = ckpt is not None and c.init_from == "resume" and "dcp" in ckpt.meta
    if ckpt is not None and not dcp_resume:         # a DCP resume loads with AdamW's: restore
        before = peak_rss_mib()
        load_rows(model, ckpt.parts, proc.rank, proc.world)
        print(f"rank {proc.rank}: weights of {src} read, peak host memory (RSS) "
              f"{peak_rss_mib():,.0f} MiB, {peak_rss_mib() - before:,.0f} MiB more than before")
    if proc.world > 1 and not c.fsdp:
        loss_model = nn.parallel.DistributedDataParallel(loss_model, broadcast_buffers=False)
    if c.compile:                                                   # zaya's own forward, compiled
        import kernels
        kernels.enable(model)
    params = list(loss_model.parameters())
    opt = torch.optim.AdamW([dict(params=[p for p in params if p.dim() >= 2],
                                  weight_decay=c.weight_decay),
                             dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)],
                            lr=c.lr, betas=(0.9, 0.95), fused=proc.cuda)
    return SimpleNamespace(model=model, loss_model=loss_model, opt=opt, params=params)


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def restore(job, meta):
    """Resume: the optimizer (and a DCP folder's weights: each rank reads its shards), the counters
    and the RNG that draws the batches."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_optimizer_state_dict, set_state_dict)
    if "dcp" in meta:
        msd, osd = get_state_dict(job.model, job.opt)
        dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=meta["dcp"])
        set_state_dict(job.model, job.opt, model_state_dict=msd, optim_state_dict=osd)
    else:                                                           # ckpt.pt: AdamW keyed by name
        set_optimizer_state_dict(job.model, job.opt, meta["optimizer"], options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
    job.it = meta["iter_num"]
    job.best = meta["best_val_loss"]
    torch.set_rng_state(torch.as_tensor(meta["rng"]["torch"], dtype=torch.uint8))


@torch.no_grad()
def evaluate(c, proc, data, job):
    """Val losses on fixed batches (own generator); diffusion top-1 accuracy by block slot."""
    job.loss_model.eval()
    val_gen = torch.Generator().manual_seed(c.seed + 1)
    K = c.block_size
    sums = torch.zeros(3 + K, device=proc.device)               # loss, ar, diff, accuracy [K]
    for _ in range(c.eval_iters):
        batch = get_batch(data.val, c.batch_size, c.seq_len, val_gen, proc.rank, proc.world,
                          proc.device)
        with proc.autocast:
            loss, ar, diff, hits = job.loss_model(batch)
        acc = hits.view(-1, K).float().mean(0) if hits is not None else sums.new_zeros(K)
        sums += torch.cat([torch.stack([loss, ar, ar if diff is None else diff]).float(), acc])
    job.loss_model.train()
    m = all_mean(sums / c.eval_iters).tolist()
    return dict(iter=job.it, loss=m[0], ar=m[1], diff=m[2], acc=m[3:])


def save_checkpoint(c, proc, job, path):
    """All of the run's state. FSDP: a DCP folder ckpt-dcp/iter-N in which every rank writes its
    own shards, via a temp folder renamed when complete (older ones removed only then); else one
    ckpt.pt on rank 0 via a temp file, the optimizer keyed by name (any layout)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    meta = dict(config=asdict(job.model.config), iter_num=job.it, best_val_loss=job.best,
                mode=c.mode, tokenizer=c.tokenizer, data=c.data, train_cfg=vars(c),
                rng=dict(torch=torch.get_rng_state().tolist()))
    root = os.path.join(c.out_dir, "ckpt-dcp")
    final = os.path.join(root, f"iter-{job.it:08d}")
    if c.fsdp and not os.path.isdir(final):         # else: saved at this iteration already
        tmp = os.path.join(root, f"tmp-iter-{job.it:08d}")          # a killed save's: overwritten
        msd, osd = get_state_dict(job.model, job.opt)               # this rank's shards: DTensors
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)
        if proc.rank == 0:
            Path(tmp, "meta.json").write_text(json.dumps(meta))
            os.rename(tmp, final)                                   # now the newest: complete
            for old in set(os.listdir(root)) - {os.path.basename(final)}:
                shutil.rmtree(os.path.join(root, old))
        dist.barrier()
    elif not c.fsdp:
        msd, osd = get_state_dict(job.model, job.opt, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))                # a collective under DDP
        if proc.rank == 0:
            _atomic_write(path, lambda f: torch.save(dict(meta, model=msd, optimizer=osd), f))


def train_step(c, proc, data, job):
    """One optimizer step at iteration job.it -> (loss, ar, diff) averaged over ranks, grad norm."""
    for g in job.opt.param_groups:
        g["lr"] = get_lr(job.it, c)
    more = None                                     # self-distilled windows, drawn first
    if data.extra:
        more = get_batch(data.distilled, data.extra, c.seq_len, None, proc.rank, proc.world,
                         proc.device)
    batch = get_batch(data.train, c.batch_size, c.seq_len, None, proc.rank, proc.world,
                      proc.device)
    with proc.autocast:
        loss, ar, diff, _ = job.loss_model(batch, more)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(job.params, c.grad_clip or float("inf"))  # FSDP: DTensor
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
    stats = all_mean(torch.stack([loss, ar, ar if diff is None else diff]).detach().float())
    stats = stats.tolist()
    if not all(map(math.isfinite, stats + [norm])):
        raise Diverged(f"loss {stats[0]}, grad norm {norm} at iter {job.it}; do lower --lr, resume "
                       f"from {os.path.join(c.out_dir, 'ckpt.pt')} (kept)")
    job.opt.step()
    job.opt.zero_grad(set_to_none=True)
    return stats, norm


def train_loop(c, proc, data, job):
    """Steps until max_iters: a log line every log_interval, an eval and a checkpoint every
    eval_interval; Ctrl-C finishes the step, saves and stops (Interrupted, status 130)."""
    ckpt = os.path.join(c.out_dir, "ckpt.pt")
    history = []
    evals = []
    start = job.it                                                  # for the eta
    t_start = time.time()
    it_log = job.it                                                 # the last log line's
    t_log = t_start
    stop = []
    if proc.rank == 0 and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda *_: stop.append(job.it))
    while job.it < c.max_iters and not stop:
        stats, norm = train_step(c, proc, data, job)
        imbalance = update_balancing_biases(job.model, c.bias_update_rate)
        history.append(dict(iter=job.it, loss=stats[0], ar=stats[1],
                            diff=stats[2] if c.mode == "tidar" else None))
        job.it += 1
        if (job.it - 1) % c.log_interval == 0 or job.it == c.max_iters:
            now = time.time()
            diff_s = f", diff {stats[2]:.4f}" if c.mode == "tidar" else ""
            tok_s = (job.it - it_log) * c.batch_size * proc.world * c.seq_len / (now - t_log)
            eta = (now - t_start) / (job.it - start) * (c.max_iters - job.it)
            proc.log(f"iter {job.it - 1}: loss {stats[0]:.4f} (ar {stats[1]:.4f}{diff_s}), lr "
                     f"{get_lr(job.it - 1, c):.2e}, norm {norm:.2f}, imbalance {imbalance:.2f}, "
                     f"{tok_s:,.0f} tok/s, eta {eta:.0f}s")
            t_log = now
            it_log = job.it
        if job.it % c.eval_interval == 0 or job.it == c.max_iters:
            ev = evaluate(c, proc, data, job)
            evals.append(ev)
            job.best = min(job.best, ev["loss"])
            acc = " ".join(f"{100 * a:.0f}" for a in ev["acc"])
            acc = f"; diffusion top-1 % by block position 0..{c.block_size - 1}: {acc}"
            proc.log(f"eval {job.it}: val ar {ev['ar']:.4f}"
                     + (f", diff {ev['diff']:.4f}{acc}" if c.mode == "tidar" else ""))
            save_checkpoint(c, proc, job, ckpt)
    if stop:
        save_checkpoint(c, proc, job, ckpt)
        raise Interrupted(f"interrupted at iter {job.it}: saved {ckpt}; "
                          f"do continue with --init_from=resume --out_dir={c.out_dir}")
    summary = dict(mode=c.mode, iter=job.it, losses=history, evals=evals, best_val_loss=job.best,
                   ckpt=latest_checkpoint(c.out_dir))
    if proc.rank == 0:                                              # for plots and tests
        _atomic_write(os.path.join(c.out_dir, "log.json"),
                      lambda tmp: Path(tmp).write_text(json.dumps(summary)))
    return summary


@torch.no_grad()
def load_rows(model, parts, rank, world):
    """Copy a checkpoint's parts (zaya.load_checkpoint) into a model whose tensors are allocated but
    unset. FSDP2 shards each parameter along dim 0 in torch.chunk pieces, so rank r owns rows
    r * ceil(n / world) on: it reads only those (a DTensor's local shard); buffers are whole."""
    for name, t in model.state_dict().items():
        if hasattr(t, "to_local"):                                  # a DTensor
            n = t.shape[0]                                          # the whole tensor's rows
            t = t.to_local()
            lo = min(rank * -(-n // world), n)
            t.copy_(parts[name][1](slice(lo, lo + len(t))))
        else:
            t.copy_(parts[name][1](slice(None)))


def export(c, src):
    """--export=DIR: the checkpoint --init_from names (resume: out_dir's newest) in the native HF
    layout (zaya.save_hf), in --dtype (auto: as stored), one safetensors file's tensors in memory
    at a time: a DCP checkpoint is read tensor by tensor, without a process group. Its tokenizer
    .json and training log (training_log.json) are copied beside."""
    config, parts, meta = load_checkpoint(src)
    with torch.device("meta"):
        sizes = Zaya(config).state_dict()
    check_tensors(src, sizes, parts)
    dt = getattr(torch, c.dtype, None) or parts["embed_tokens.weight"][1](slice(1)).dtype  # auto
    sizes = {k: v.to(torch.float32 if k.endswith("balancing_biases") else dt)
             for k, v in sizes.items()}
    save_hf(c.export, config, sizes,
            lambda names: {k: parts[k][1](slice(None)).to(sizes[k].dtype) for k in names})
    folder = Path(meta["dcp"]).parents[1] if "dcp" in meta else Path(   # out/ckpt-dcp/iter-N
        src if os.path.isdir(src) else os.path.dirname(src))             # the run's out_dir
    tok = folder if "hf_dir" in meta else Path(meta.get("tokenizer", "bytes"))   # a file or dir
    tok = tok / "tokenizer.json" if tok.is_dir() else tok
    logs = [p for p in (folder / "log.json", folder / "training_log.json") if p.is_file()]
    for f, name in ((tok, "tokenizer.json"), (logs[0] if logs else None, "training_log.json")):
        if f and f.is_file():                                       # bytes: no tokenizer file
            _atomic_write(os.path.join(c.export, name), functools.partial(shutil.copyfile, f))
    print(f"exported {src} to {c.export} (Hugging Face layout, {len(parts)} tensors"
          f"{', tokenizer.json' * tok.is_file()}{', training_log.json' * bool(logs)})")


# -----------------------------------------------------------------------------
# the dry run: sizes of a run, allocating nothing
def dry_run(c):
    """Parameters, memory per GPU under FSDP, training FLOPs. Bytes for N params, G GPUs, t =
    batch_size T tokens per GPU (T = S for AR, 2S for TiDAR): states 16 N / G (fp32 weights + grads,
    AdamW m, v; sharded); gathered bf16 2 (2 N_layer + V d) (layer in use + prefetched + embedding);
    activations t (4 L d + a) (fp32 residual per layer, a = 2 (16 d + 6 (nq+nkv) hd + 4 I) for one
    recomputed layer, L of them without grad_checkpointing) + 12 V per loss_chunk token + T^2
    (mask). FLOPs per data token: 6 (N_active + V d) per forwarded token (T / S of them) + 12 L nq
    hd per attended key (AR S/2; TiDAR S/2 clean + S/2 + K/2 masked: the pairs its mask allows).
    The DCP checkpoint: 12 N bytes on disk, each GPU writing its own shards of the states."""
    cfg = ZayaConfig.from_name(c.preset, block_size=c.block_size)
    with torch.device("meta"):
        model = Zaya(cfg)
    N = model.num_params()
    Na = model.num_params(active=True)                              # active per token
    L, d, V, I = (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size,
                  cfg.moe_intermediate_size)
    S = c.seq_len
    GiB = 2**30
    C = (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim
    A = cfg.num_attention_heads * cfg.head_dim
    states = 16 * N / c.gpus
    gathered = 2 * (2 * (N - V * d) / L + V * d)
    print(f"{c.preset}: {N:,} parameters, {Na:,} active per token (one expert, embedding "
          f"excluded)\nper GPU, FSDP over {c.gpus} GPUs, batch_size {c.batch_size}, seq_len {S}, "
          f"grad_checkpointing={c.grad_checkpointing}, loss_chunk {c.loss_chunk}: states 16 N / G "
          f"= {states / GiB:.1f} GiB, gathered bf16 = {gathered / GiB:.1f} GiB (formulas: "
          "train.dry_run.__doc__)")
    print(f"checkpoint (DCP): {12 * N / GiB:.1f} GiB on disk (fp32 weights, AdamW m and v), each "
          f"GPU writing its own {12 * N / c.gpus / GiB:.1f} GiB of the states above: no full copy "
          f"on any rank, no GPU memory beyond them; the HF export in bf16: {2 * N / GiB:.1f} GiB")
    for mode, T, keys in (("AR", S, S / 2), ("TiDAR", 2 * S, S + c.block_size / 2)):
        t = c.batch_size * T
        act = t * (4 * L * d + 2 * (16 * d + 6 * C + 4 * I) * (1 if c.grad_checkpointing else L))
        act += 12 * min(c.loss_chunk or t, t) * V + T * T
        flops = T // S * 6 * (Na + V * d) + 12 * L * A * keys
        print(f"  {mode:5s} T={T}: activations {act / GiB:.1f} GiB, total "
              f"{(states + gathered + act) / GiB:.1f} GiB; training FLOPs per data token "
              f"{flops / 1e9:.2f} GFLOP")
    return dict(params=N, active=Na)


# -----------------------------------------------------------------------------
# the pipelines of `python train.py` (docs/results.md); the paper's loss (docs/tidar.md 1), ours
PAPER = dict(distill=0.0, real_diffusion=True, pos_decay=0.0, slot0=1.0, kl=0.0, alpha=1.0)
RECIPE = dict(distill=0.5, distill_temp=1.0, real_diffusion=False, pos_decay=2.0, slot0=0.0, kl=1.0,
              tv=2.0, alpha=3.0)
MODELS = Path(__file__).resolve().parent / "models"    # the bundled pair: base, its conversion
BASE = dict(preset="small", tokenizer="bpe4096", seq_len=256, batch_size=8, max_iters=4800,
            warmup_iters=100, eval_interval=600, eval_iters=16, log_interval=100)
CONVERT = dict(RECIPE, seq_len=256, batch_size=8, distill_rows=384, distill_len=320, max_iters=120,
               lr=1e-3, min_lr=1e-4, eval_interval=120, eval_iters=16, log_interval=40)
PIPELINES = {  # (AR pretraining from scratch, TiDAR conversion); docs/results.md has their times
    "default": (None, CONVERT), "convert": (None, CONVERT), "base": (BASE, None),
    "long": (None, dict(CONVERT, distill_rows=2048, max_iters=1600, eval_interval=200)),
    "scratch": (BASE, CONVERT)}
ABLATION = {"paper": PAPER, "+ self-distillation": dict(PAPER, distill=0.5),
            "+ loss shape": dict(PAPER, distill=0.5, pos_decay=2.0, slot0=0.0, kl=1.0),
            "+ real rows causal": dict(RECIPE, distill_temp=0.0, tv=0.0),
            "+ sampled text": dict(RECIPE, tv=0.0), "AR only": dict(mode="ar")}   # + the default
EVERY_TABLE = dict(weights=(0.5, 0.75, 0.25), seeds=range(4),
                   speed_runs={**SPEED_RUNS, **LEVEL_RUNS})


def reproduce(o):
    """--pipeline= (docs/results.md section 2). default: the bundled base (models/zaya-small)
    converted by CONVERT (self-distillation, then the TiDAR loss), reported on held-out code beside
    the bundled conversion (models/zaya-small-tidar); convert: the same from --init_from; long:
    the bundled conversion's recipe; base: the bundled base's AR pretraining; scratch: base, then
    convert; eval: the report alone on --init_from's model (default out_dir's), every table;
    ablation: each ABLATION recipe from --init_from (default the bundled base). --export=DIR: the
    model in the HF layout, tokenizer and log beside. Other flags reach every stage."""
    out = o.get("out_dir", DEFAULTS["out_dir"])
    p = o["pipeline"]
    check(p in (*PIPELINES, "eval", "ablation"), f"--pipeline={p} is unknown; do use default, "
          "convert, long, base, scratch, eval or ablation")
    check(p != "convert" or "init_from" in o, "--pipeline=convert converts an AR checkpoint; do "
          "pass --init_from=PATH (a ckpt.pt, its out_dir, or a Hugging Face directory)")
    skip = ("pipeline", "out_dir", "init_from", "export")              # the pipeline's own flags
    rest = {"data_cache": f"{out}/data", **{k: v for k, v in o.items() if k not in skip}}
    ar, tidar = PIPELINES.get(p, (None, None))
    base = o.get("init_from", str(MODELS / "zaya-small"))          # the AR model converted
    if ar:
        base = f"{out}/ar" if tidar else out
        run({**ar, **rest, "mode": "ar", "init_from": "scratch", "out_dir": base})
    if tidar:
        check(os.path.exists(base), f"no AR model at {base}; do pass --init_from=PATH")
        run({**tidar, **rest, "mode": "tidar", "init_from": base, "out_dir": out})
    data = o.get("data", "stdlib")
    if p == "ablation":
        return ablation({**CONVERT, **rest}, out, base, data)
    final = o.get("init_from", out) if p == "eval" else out
    if o.get("export"):
        export(SimpleNamespace(export=o["export"], dtype="bfloat16"), final)
    return report(final, data, rest, p, out)


def report(final, data, rest, p, out):
    """The held-out loss of the model in `final`; for a converted model the decoding report (eval:
    32 prompts, every table; else 16; out/decode.json). default: first the bundled conversion's
    report (its speed leads), then this run's under the same evaluation but the speed, then both
    side by side."""
    model, prompts = heldout_prompts(final, data, 32 if p == "eval" else 16, rest["data_cache"])
    if not converted(model):
        loss = heldout_loss(model, data, rest["data_cache"])
        _, decode = load_tokenizer(model)
        for x in prompts[:3]:
            toks = generate_ar(model, x[None], 128)[0][0, len(x):]
            print(f"--- greedy continuation of held-out code:\n{decode(toks.tolist())}")
        return dict(loss=loss)
    kw = dict(EVERY_TABLE if p == "eval" else dict(seeds=(0,)),
              draft_scale=rest.get("draft_scale", DRAFT_SCALE))
    bundled = MODELS / "zaya-small-tidar"
    first = None
    if p == "default" and bundled.is_dir():
        print(f"=== the bundled conversion, {bundled}")
        b = heldout_prompts(str(bundled), data, 1, rest["data_cache"])[0]
        first = dict(loss=heldout_loss(b, data, rest["data_cache"]))
        first.update(decode_report(b, prompts, None, **kw))
        print(f"\n=== this run's conversion, {final}: the same evaluation but the speed")
        kw["speed_runs"] = {}
    os.makedirs(out, exist_ok=True)
    res = dict(loss=heldout_loss(model, data, rest["data_cache"]))
    res.update(decode_report(model, prompts, out, **kw))
    if first:
        side_by_side(res, first)
    return dict(res, bundled=first) if first else res


def ablation(conv, out, base, data):
    """--pipeline=ablation: from the AR checkpoint `base`, the conversion settings `conv` under each
    ABLATION recipe, then `conv` itself (the default): val AR loss, and on 32 held-out prompts
    lossless greedy, T=1 over seeds 0-3, mix 0.5 and prompt lookup; in out/ablation/<recipe>."""
    table = {}
    for name, recipe in [*ABLATION.items(), ("default", {})]:
        d = f"{out}/ablation/{name.strip('+ ').replace(' ', '-')}"
        run({**conv, "mode": "tidar", **recipe, "init_from": base, "out_dir": d})
        table[name] = [json.loads(Path(d, "log.json").read_text())["evals"][-1]["ar"]]
        if name == "AR only":
            continue
        model, prompts = heldout_prompts(d, data, 32, conv["data_cache"])
        rows = decode_report(model, prompts, d, None, (0.5,), range(4), threads=2, speed_runs={},
                             draft_scale=conv.get("draft_scale", DRAFT_SCALE))["rows"]   # 4 seeds
        tpf = {r["name"]: r["tokens_per_forward"] for r in rows}
        t1 = sum(tpf[f"lossless T=1 seed {s}"] for s in range(4)) / 4
        table[name] += [tpf["lossless"], rows[1]["sd"], t1, tpf["mix w=0.5"],
                        tpf["prompt lookup"]]
    print(f"ablation ({conv['max_iters']} iterations from {base}; val AR on {conv['eval_iters']} "
          "fixed batches; tokens/forward)\nrecipe               val AR  vs AR only  lossless "
          "greedy  T=1, 4 seeds  mix 0.5  lookup")
    for name, (val, *tpf) in table.items():
        vs = f"{100 * (val / table['AR only'][0] - 1):+9.1f}%"
        cells = "  {:6.2f} +- {:4.2f} {:13.2f} {:8.2f} {:7.2f}".format(*tpf) if tpf else ""
        print(f"{name:20s} {val:7.4f} {vs}{cells}")
    return table


SUMMARY = [("held-out AR loss, nats/byte", "loss", "nats_per_byte"),   # (label, row, key)
           ("lossless greedy, tokens/forward", "lossless", "tokens_per_forward"),
           ("lossless T=1 (seed 0), tokens/forward", "lossless T=1 seed 0", "tokens_per_forward"),
           ("mix w=0.5, tokens/forward", "mix w=0.5", "tokens_per_forward")]


def side_by_side(res, bundled):
    """The main job's last table: its short conversion beside the bundled long one."""
    def value(r, name, key):
        return r["loss"][key] if name == "loss" else {x["name"]: x for x in r["rows"]}[name][key]
    print(f"\n=== summary: {'':27s} this run ({CONVERT['max_iters']} iterations)  the bundled")
    for label, name, key in SUMMARY:
        print(f"  {label:40s} {value(res, name, key):12.3f} {value(bundled, name, key):12.3f}")


def heldout_prompts(out, data, n_prompts, cache=None):
    """The model in out (newest checkpoint or HF directory; float32 whatever it stores) and n
    128-token prompts spread over the held-out split (never trained on); corpus cache in `cache`."""
    model = Zaya.from_pretrained(out, dtype=torch.float32).eval()
    _, val = load_corpus(data, tokenizer_of(model), cache or os.path.join(out, "data"), 129)
    starts = torch.linspace(0, len(val) - 129, n_prompts).long().tolist()
    return model, [torch.from_numpy(val[s:s + 128].astype("int64")) for s in starts]


def tokenizer_of(model):
    """--tokenizer of a loaded model's run: its checkpoint's, or its HF directory's own file."""
    meta = model.checkpoint_meta
    hf = os.path.join(meta.get("hf_dir", ""), "tokenizer.json")
    return hf if os.path.isfile(hf) else meta.get("tokenizer", "bytes")


def converted(model):
    """Whether a loaded model's run was a TiDAR conversion: its checkpoint's mode, or the mode in
    its HF directory's training_log.json (none: taken as converted)."""
    log = Path(model.checkpoint_meta.get("hf_dir", ""), "training_log.json")
    mode = json.loads(log.read_text())["mode"] if log.is_file() else None
    return (mode or model.checkpoint_meta.get("mode", "tidar")) == "tidar"


@torch.no_grad()
def heldout_loss(model, data, cache, window=256, rows=32):
    """The AR loss of every held-out token (the val files, never trained on; windows of `window`
    tokens, each from a fresh context), in nats per token and per byte of the files' text: bytes
    are the unit every tokenizer shares."""
    _, val = load_corpus(data, tokenizer_of(model), cache, window + 1)
    ids = torch.from_numpy(val.astype("int64"))
    n = (len(ids) - 1) // window * window                          # whole windows
    x = ids[:n].view(-1, window)                                   # [N, window]
    y = ids[1:n + 1].view(-1, window)
    nats = sum(float(model(x[i:i + rows], y[i:i + rows])[1]) * len(x[i:i + rows])
               for i in range(0, len(x), rows)) * window
    enc, special = get_tokenizer(tokenizer_of(model))
    scored = [t for t in ids[1:n + 1].tolist() if t not in (special["eot"], special["pad"])]
    text = len(enc.decode(scored).encode())                        # bytes of the scored tokens
    print(f"held-out loss: {nats / n:.4f} nats/token, {nats / text:.4f} nats/byte "
          f"({n:,} tokens of the val files, windows of {window})")
    return dict(nats_per_token=nats / n, nats_per_byte=nats / text)


def main(argv=None):
    """Parse --key=value flags and run. --mode, --dry_run, --export (without --pipeline) or
    --init_from=resume: one run; otherwise a pipeline (default: --pipeline=default, the small
    reproduction), which --export=DIR follows with the export of its model."""
    argv = sys.argv[1:] if argv is None else argv
    overrides = parse_args(argv, DEFAULTS)
    one_run = {"mode", "dry_run"} & set(overrides) or overrides.get("init_from") == "resume" or (
        "export" in overrides and "pipeline" not in overrides)
    check(not (one_run and "pipeline" in overrides), "--pipeline runs its stages, and --mode, "
          "--dry_run and --init_from=resume one run; do pass one or the other")
    if not one_run:
        overrides.setdefault("pipeline", "default")
    try:
        return run(overrides) if one_run else reproduce(overrides)
    finally:
        if dist.is_initialized():
            # free FSDP's sharded tensors (in reference cycles) first, or exit can abort (gloo)
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError, Diverged, Interrupted) as e:   # CheckpointError is a ValueError
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{'stopped' if isinstance(e, Interrupted) else 'error'}: "
                  f"{' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(130 if isinstance(e, Interrupted) else 1 if isinstance(e, Diverged) else 2)
