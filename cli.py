"""
What both command lines (train.py, sample.py) share: the --key=value flag parser, the one-line
error for bad input, and the tokenizers that turn text into ids and back.

Tokenizers: "bytes" (256 single-byte tokens plus <|endoftext|>, <|mask|> and <|pad|>: offline,
and any text encodes), or a Hugging Face tokenizer.json read with the `tokenizers` package (the
8B checkpoint's own: <mask> is id 4; or one train.py trained, --tokenizer=bpeN).
"""
import os
from types import SimpleNamespace

import tiktoken


# -----------------------------------------------------------------------------
# flags and bad input
class UsageError(ValueError):
    """Bad input; the CLIs print it as one line and exit with status 2, no traceback."""


def check(ok, msg):
    if not ok:
        raise UsageError(msg)


def parse_args(argv, defaults):
    """--key=value pairs -> dict of overrides of `defaults`. Unknown keys are rejected, values take
    the default's type, a bare --flag is --flag=True for a bool."""
    out = {}
    for arg in argv:
        key, eq, val = arg.removeprefix("--").partition("=")
        kind = type(defaults.get(key))
        check(arg.startswith("--") and key in defaults and (eq or kind is bool),
              f"unknown or malformed flag {arg!r}; do use --key=value with key one of: "
              f"{', '.join(defaults)}")
        try:
            out[key] = {"True": True, "False": False}[val or "True"] if kind is bool else kind(val)
        except (KeyError, ValueError):
            want = "True or False" if kind is bool else kind.__name__
            raise UsageError(f"--{key}={val}: expected {want}; "
                             f"do write e.g. --{key}={defaults[key]}") from None
    return out


# -----------------------------------------------------------------------------
# tokenizers
def get_tokenizer(name):
    """(encoder, ids), ids = dict(eot, mask, pad, vocab_size). vocab_size is the model's: n_vocab
    rounded up to a multiple of 64, so drop ids >= enc.n_vocab before enc.decode(ids). name: bytes,
    or a path: a Hugging Face tokenizer.json or the directory holding one (train.py's --tokenizer
    =bpeN trains one)."""
    if name != "bytes" and ("/" in name or name.endswith(".json") or os.path.exists(name)):
        return hf_tokenizer(name)
    check(name == "bytes", f"no tokenizer {name!r}; do use --tokenizer=bytes, bpeN (train.py: a "
          "BPE of N ids trained on --data) or the path of a tokenizer.json")
    ranks = {bytes([i]): i for i in range(256)}  # 256 single-byte tokens, no merges: any text
    special = {"<|endoftext|>": 256, "<|mask|>": 257, "<|pad|>": 258}
    enc = tiktoken.Encoding("bytes", pat_str=r"[^\n]+|\n", mergeable_ranks=ranks,
                            special_tokens=special)
    ids = dict(eot=enc.eot_token, mask=enc.encode_single_token("<|mask|>"),
               pad=enc.encode_single_token("<|pad|>"))
    return enc, dict(ids, vocab_size=(enc.n_vocab + 63) // 64 * 64)


def hf_tokenizer(path):
    """get_tokenizer for a tokenizer.json, read with the `tokenizers` package: an encoder with
    tiktoken's methods; the mask token its <mask> (ZAYA's diffusion checkpoint: id 4) or None."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    check(os.path.isfile(file), f"no tokenizer file {file}; do pass a tokenizer.json or its folder")
    try:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(file)
    except Exception as e:
        raise UsageError(f"cannot read tokenizer {file} ({type(e).__name__}: {e}); do pass a "
                         "tokenizer.json, with the `tokenizers` package installed") from None
    vocab = tok.get_vocab()
    first = lambda *names: next((vocab[n] for n in names if n in vocab), None)   # noqa: E731
    eot = first("<|endoftext|>", "<eos>", "</s>", "<|end_of_text|>")
    check(eot is not None, f"tokenizer {file} has no end-of-text token; do add <eos> to it")
    enc = SimpleNamespace(
        n_vocab=tok.get_vocab_size(), encode=lambda s: tok.encode(s, add_special_tokens=False).ids,
        encode_ordinary_batch=lambda texts: [e.ids for e in tok.encode_batch(
            texts, add_special_tokens=False)], decode=tok.decode)
    pad = first("<pad>", "[PAD]", "<|pad|>")                         # ZAYA1's <pad> is id 0
    return enc, dict(eot=eot, mask=first("<mask>", "[MASK]", "<|mask|>"),
                     pad=eot if pad is None else pad, vocab_size=(enc.n_vocab + 63) // 64 * 64)


def load_tokenizer(model):
    """(encode, decode) for a loaded checkpoint: its run's --tokenizer, or its HF directory's."""
    meta = getattr(model, "checkpoint_meta", {})
    enc, _ = get_tokenizer(meta.get("hf_dir", meta.get("tokenizer", "bytes")))
    return enc.encode, (lambda ids: enc.decode([i for i in ids if i < enc.n_vocab]))
