"""Tokenizers for LLM-JEPA: train a SentencePiece BPE model, or extend an existing HF tokenizer.

Either way the result is a directory that `transformers.AutoTokenizer` loads offline as a fast
tokenizer, with these special tokens registered:

    <unk>=0  <s>=1  </s>=2  <pad>=3  <|view_sep|>=4  <|predictor_1|>..<|predictor_K|>=5..4+K

(fixed ids for a trained tokenizer; an extended one keeps its ids and appends what is missing).

Encoding never adds BOS/EOS: the packer places every special token itself, by id. Text never
produces a special token either: user data must not be able to inject `<|view_sep|>` or a predictor.

Leading spaces: SentencePiece's `add_dummy_prefix` is OFF (and the HF tokenizer matches it). So
"hello" and " hello" tokenize differently, but decode(encode(s)) == s exactly and
encode(a) + encode(b) decodes to a + b: a packed row of views decodes to exactly its texts.

CLI:
    python -m data_pipeline.tokenizer train --inputs 'corpus/*.jsonl' --views messages --out DIR
    python -m data_pipeline.tokenizer extend --src HF_DIR --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# transformers is imported lazily: it takes seconds and the constants do not need it.
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS = "<s>"
EOS = "</s>"
PAD = "<pad>"
UNK = "<unk>"
VIEW_SEP = "<|view_sep|>"
DEFAULT_NUM_PREDICTOR_TOKENS = 8
SPM_FILE = "spm.model"
# The files that determine how text maps to ids (tokenizer_hash); spm.model is a copy, not used by HF.
TOKENIZATION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
# Keys that from_pretrained writes into a re-saved tokenizer_config.json; they do not affect ids.
_LOAD_BOOKKEEPING_KEYS = {"is_local", "local_files_only", "name_or_path", "_commit_hash"}
_PREDICTOR_RE = re.compile(r"^<\|predictor_(\d+)\|>$")
_NUM_BYTE_PIECES = 256  # byte_fallback adds <0x00>..<0xFF> to the vocab
# SentencePiece silently skips texts over max_sentence_length bytes; we cut them to a prefix
# instead (4 bytes per char at most), so long documents still count. Bounds training memory.
_MAX_SENTENCE_CHARS = 4096


def predictor_token(i: int) -> str:
    """The i-th predictor token, 1-based: predictor_token(1) == "<|predictor_1|>"."""
    if i < 1:
        raise ValueError(f"predictor tokens are numbered from 1, got {i}")
    return f"<|predictor_{i}|>"


def extra_tokens(num_predictor_tokens: int) -> list[str]:
    """view_sep then predictor_1..K, in id order for a trained tokenizer."""
    if num_predictor_tokens < 0:
        raise ValueError(f"num_predictor_tokens must be >= 0, got {num_predictor_tokens}")
    return [VIEW_SEP] + [predictor_token(i) for i in range(1, num_predictor_tokens + 1)]


def lone_surrogate(text: str) -> str | None:
    """Where `text` holds a lone UTF-16 surrogate, or None. A JSON escape such as "\\ud800"
    without its pair decodes to one; such a string is not Unicode text, and SentencePiece and
    `tokenizers` reject it with errors that name no input."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")  # fails on surrogates only
    except UnicodeEncodeError as e:
        char = f"U+{ord(text[e.start]):04X}"
        return f"lone surrogate {char} at character {e.start} (half of a UTF-16 pair, not text)"
    return None


# ----------------------------------------------------------------------------- training


class _TextStream:
    """Feeds texts to SentencePiece, skipping empty ones and keeping any exception raised by the
    source: SentencePiece turns it into a RuntimeError string, so we re-raise the original."""

    def __init__(self, texts: Iterable[str]):
        self._it = iter(texts)
        self._read = 0  # texts taken from the source, empty ones included
        self.count = 0
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            while True:
                text = next(self._it)
                self._read += 1
                if text:
                    self.count += 1
                    if why := lone_surrogate(text):
                        raise ValueError(f"texts[{self._read - 1}]: {why}")
                    return text[:_MAX_SENTENCE_CHARS]
        except StopIteration:
            raise
        except BaseException as e:
            self.error = e
            raise


def _train_spm(
    texts: Iterable[str], vocab_size: int, extras: list[str], max_sentences: int, seed: int
) -> bytes:
    import sentencepiece as spm

    stream = _TextStream(texts)
    model = io.BytesIO()
    # The seed drives the sampling of max_sentences out of a larger input; training itself is
    # deterministic. It is process-global SentencePiece state.
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=stream,
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,  # total, specials and byte pieces included
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            # Control symbols (not user_defined_symbols): SentencePiece never produces them from
            # text, so a literal "<|view_sep|>" in user data stays plain text. User-defined symbols
            # would be matched inside the text. They take ids 4.. in this order.
            control_symbols=extras,
            byte_fallback=True,  # any character outside the vocab becomes UTF-8 byte pieces: no <unk>
            split_digits=True,
            # No normalization at all, so that decode(encode(s)) == s: no NFKC, runs of spaces,
            # tabs and newlines are kept. Only " " is escaped to "▁" (so a literal U+2581 in the
            # input decodes as a space, in SentencePiece and in HF alike).
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,  # see the module docstring
            allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) become one piece
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=4 * _MAX_SENTENCE_CHARS,
            num_threads=min(4, os.cpu_count() or 1),
            minloglevel=2,  # SentencePiece's own progress log is very chatty
        )  # fmt: skip
    except RuntimeError as e:
        if stream.error is not None:
            raise stream.error from None
        if stream.count == 0:  # SentencePiece fails with an empty message then
            raise ValueError("no non-empty texts to train the tokenizer on") from None
        # "INTERNAL: src/trainer_interface.cc(744) [check] Vocabulary size too high ..." → the reason
        raise ValueError(f"sentencepiece training failed: {str(e).split('] ', 1)[-1]}") from None
    return model.getvalue()


def _backend_from_spm(model_proto: bytes):
    """Build the `tokenizers` equivalent of a SentencePiece BPE model trained by _train_spm.

    SentencePiece BPE encodes the whole (space-escaped) string, repeatedly merging the adjacent
    pair whose concatenation is the highest-scoring piece. A `tokenizers` BPE model with merges
    ranked by that score, no pre-tokenizer (SentencePiece does not split words when encoding) and
    byte fallback gives the same ids; the tests check it string by string.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = pb.ModelProto()
    proto.ParseFromString(model_proto)
    norm = proto.normalizer_spec
    if (
        proto.trainer_spec.model_type != pb.TrainerSpec.BPE
        or norm.add_dummy_prefix
        or norm.precompiled_charsmap
    ):
        raise ValueError("only BPE models with identity normalization and no dummy prefix convert")

    pieces = proto.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = {p.piece for p in pieces if p.type == pb.ModelProto.SentencePiece.NORMAL}
    # Every split of a piece into two pieces is a merge SentencePiece may take; rank by the merged
    # piece's score (higher first). Byte and control pieces never take part in merges.
    ranked = []
    for i, p in enumerate(pieces):
        if p.piece not in normal:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if left in normal and right in normal:
                ranked.append((-p.score, i, vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]

    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True)
    )
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    controls = (pb.ModelProto.SentencePiece.CONTROL, pb.ModelProto.SentencePiece.UNKNOWN)
    backend.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in pieces if p.type in controls]
    )
    return backend


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 8000,
    num_predictor_tokens: int = DEFAULT_NUM_PREDICTOR_TOKENS,
    max_sentences: int = 2_000_000,
    seed: int = 0,
) -> PreTrainedTokenizerFast:
    """Train a SentencePiece BPE tokenizer on `texts` and save it as an HF fast tokenizer.

    `texts` is consumed entirely; at most `max_sentences` of them (a seeded random sample) are kept
    in memory for training. `vocab_size` is the total vocabulary, specials included. Writes
    tokenizer.json, tokenizer_config.json and the raw spm.model to `out_dir`; returns the tokenizer
    loaded back from there.
    """
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of strings, not one string")
    extras = extra_tokens(num_predictor_tokens)
    min_vocab = 4 + len(extras) + _NUM_BYTE_PIECES
    if vocab_size <= min_vocab:
        raise ValueError(
            f"vocab_size must be > {min_vocab} (4 specials + {len(extras)} view_sep/predictor tokens"
            f" + {_NUM_BYTE_PIECES} byte pieces), got {vocab_size}"
        )
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    model_proto = _train_spm(texts, vocab_size, extras, max_sentences, seed)

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_backend_from_spm(model_proto),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=extras,  # transformers 5 name of additional_special_tokens
        # Text never becomes a special token, even through tok(text): matches SentencePiece.
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,  # would rewrite " ." to "." on decode
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    (out / SPM_FILE).write_bytes(model_proto)
    return load_tokenizer(out)


# ----------------------------------------------------------------------------- loading, extending


def load_tokenizer(tok_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a local tokenizer directory as a fast tokenizer; no network, no remote code."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not Path(tok_dir).is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {tok_dir}")
    tok = AutoTokenizer.from_pretrained(
        str(tok_dir), local_files_only=True, trust_remote_code=False
    )
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ValueError(f"{tok_dir} loads as {type(tok).__name__}, not a fast tokenizer")
    return tok


def extend_tokenizer(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_predictor_tokens: int = DEFAULT_NUM_PREDICTOR_TOKENS,
) -> PreTrainedTokenizerFast:
    """Add whichever of bos/eos/unk/pad, view_sep and predictor_1..K `src_dir` lacks; save to `out_dir`.

    Tokens that exist keep their ids (an existing bos stays bos even if it is not "<s>"); new ones
    are appended after the current vocabulary, so the model's embeddings must be resized to len(tok).
    """
    from tokenizers import AddedToken

    def special(content: str) -> AddedToken:
        return AddedToken(content, special=True, normalized=False)

    tok = load_tokenizer(src_dir)
    named = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    missing = {
        attr: special(tok_str) for attr, tok_str in named.items() if getattr(tok, attr) is None
    }
    registered = set(tok.all_special_tokens)
    extras = [special(t) for t in extra_tokens(num_predictor_tokens) if t not in registered]
    if extras:
        missing["extra_special_tokens"] = extras
    tok.add_special_tokens(missing, replace_extra_special_tokens=False)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return load_tokenizer(out_dir)


# Files any transformers tokenizer folder has at least one of (fast, BPE, SentencePiece, WordPiece).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                    "vocab.txt")  # fmt: skip


def read_vocab(tok_dir: str | os.PathLike) -> dict[str, int] | None:
    """{token: id} of the tokenizer in `tok_dir`, added tokens included; None when the folder
    holds no tokenizer files. tokenizer.json is read by `tokenizers` alone (fast); a folder
    without one (slow-tokenizer files only) loads through transformers."""
    tok_dir = Path(tok_dir)
    if (tok_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab(
            with_added_tokens=True
        )
    if not any((tok_dir / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        str(tok_dir), local_files_only=True, trust_remote_code=False
    )
    return tok.get_vocab()


def extension_mismatch(base: dict[str, int], vocab: dict[str, int]) -> str | None:
    """Why `vocab` is neither the `base` vocabulary nor an extension of it (what `extend` makes:
    every base token keeps its id, new tokens come after), or None when it is one."""
    wrong = [(t, i) for t, i in sorted(base.items(), key=lambda kv: kv[1]) if vocab.get(t) != i]
    if not wrong:
        return None
    token, token_id = wrong[0]
    here = f"id {vocab[token]}" if token in vocab else "missing"
    return (
        f"{len(wrong):,} of the base's {len(base):,} tokens have another id or are missing "
        f"(first: {token!r}, id {token_id} in the base, {here} in this one)"
    )


def special_token_ids(
    tok: PreTrainedTokenizerFast, num_predictor_tokens: int | None = None
) -> dict:
    """{"bos", "eos", "pad", "unk", "view_sep": id, "predictors": [id of predictor_1..K]}.

    K = num_predictor_tokens, or, if None, every predictor token the tokenizer has (which must then
    be numbered 1..K without gaps). Raises ValueError naming the first missing token.
    """
    hint = "; add it with `python -m data_pipeline.tokenizer extend`"
    ids = {}
    for key in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tok, f"{key}_token_id")
        if token_id is None:
            raise ValueError(f"tokenizer has no {key}_token{hint}")
        ids[key] = token_id

    registered = set(tok.all_special_tokens)
    if num_predictor_tokens is None:
        found = [int(m.group(1)) for t in registered if (m := _PREDICTOR_RE.match(t))]
        num_predictor_tokens = max(found, default=0)
    vocab = tok.get_vocab()
    for token in extra_tokens(num_predictor_tokens):
        # Must be a registered special token: only those are kept out of ordinary text encoding.
        if token not in vocab or token not in registered:
            raise ValueError(
                f"tokenizer has no special token {token!r} (needs view_sep and"
                f" {num_predictor_tokens} predictor tokens){hint}"
            )
    ids["view_sep"] = vocab[VIEW_SEP]
    ids["predictors"] = [vocab[predictor_token(i)] for i in range(1, num_predictor_tokens + 1)]
    return ids


def tokenizer_hash(tok_dir: str | os.PathLike) -> str:
    """sha256 hex over the files that determine tokenization (names and bytes, sorted by name).

    tokenizer_config.json is hashed without the bookkeeping keys that from_pretrained adds to it
    (is_local, local_files_only, ...), so a loaded-and-resaved tokenizer keeps its hash.
    """
    tok_dir = Path(tok_dir)
    if not (tok_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tok_dir}")
    digest = hashlib.sha256()
    for name in sorted(TOKENIZATION_FILES):
        path = tok_dir / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if name == "tokenizer_config.json":
            config = {k: v for k, v in json.loads(data).items() if k not in _LOAD_BOOKKEEPING_KEYS}
            data = json.dumps(config, sort_keys=True, ensure_ascii=False).encode()
        # Name and length frame each file, so moving bytes between files changes the hash.
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def encode_views(tok: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without BOS/EOS and without ever matching a special token in the text.

    Batch-encodes in the Rust backend (multithreaded). Not thread-safe: it flips the backend's
    encode_special_tokens flag for the call, as transformers itself does on every tok(...) call.
    """
    backend = tok.backend_tokenizer
    # transformers also resets these on every call; a tokenizer.json may carry them.
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True  # "<|view_sep|>" in user text stays plain text
    try:
        encodings = backend.encode_batch(list(texts), add_special_tokens=False)
    except TypeError:  # "TextEncodeInput must be Union[...]": name the text that caused it
        for i, text in enumerate(texts):
            if why := lone_surrogate(text):
                raise ValueError(f"texts[{i}]: {why}") from None
        raise
    finally:
        backend.encode_special_tokens = previous
    return [e.ids for e in encodings]


# ----------------------------------------------------------------------------- CLI


# ---------------------------------------------------------------------------------------------
# Token ids of many texts at once (preprocessing)

# A process's first batch is encoded by both backends (Encoder): its first CHECK_TEXTS texts,
# fewer where they hold more than CHECK_CHARS characters (`tokenizers` is ~8x slower: 1,024 web
# pages of 4 KB would cost ~0.8 s per worker).
CHECK_TEXTS, CHECK_CHARS = 1024, 1 << 18


class Encoder:
    """encoder(texts) -> (ids, lengths): the token ids of every text back to back, (sum(lengths),)
    uint32, and (len(texts),) int64. Always the Rust `tokenizers` ids without special tokens,
    special-token text kept plain ("<|view_sep|>" typed in user text is not the separator).

    gigatoken computes them where it agrees: ~8x faster on our SentencePiece-style BPE, and the
    ids come as numpy arrays (no Python int per token). It is given the tokenizer without its
    added tokens (when all are special: `tokenizers` with encode_special_tokens leaves special
    text to the model too), and kept only while it gives `tokenizers`' ids on PROBE and on this
    process's first batch; otherwise, or if it cannot load the tokenizer, `tokenizers` encodes."""

    PROBE = ["", " ", "  two  spaces ", "\n", "\t\r\n x", "a\u2581b", "\u00a0\u200b", "e\u0301 ß Ω 𝔘",
             "naïve café — 東京 🙂 👨\u200d👩\u200d👧 🇫🇷", "def f(x):\n\treturn x  # 0x1F 3.14"]  # fmt: skip

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self.path, self._fast, self._first = tokenizer_json, None, True
        self._hf = Tokenizer.from_file(tokenizer_json)
        self._hf.encode_special_tokens = True
        config = json.loads(Path(tokenizer_json).read_text())
        added = config.get("added_tokens") or []
        if all(t.get("special") for t in added):  # else `tokenizers` matches them in text
            with contextlib.suppress(Exception):  # not installed, or a tokenizer it cannot load
                import gigatoken

                self._fast = gigatoken.Tokenizer.from_json(
                    json.dumps({**config, "added_tokens": []})
                )
        self._keep_fast_if_it_agrees(
            [*self.PROBE, *(f"x{t['content']}y {t['content']}" for t in added)]
        )

    @property
    def backend(self) -> str:
        return "tokenizers" if self._fast is None else "gigatoken"

    def _keep_fast_if_it_agrees(self, texts: list[str]) -> None:
        if self._fast is None:
            return
        want, want_lengths = self._hf_ids(texts)
        try:
            ids, lengths = self._fast_ids(texts)
        except Exception:  # another gigatoken version, another return type
            ids, lengths = None, None
        if not (np.array_equal(lengths, want_lengths) and np.array_equal(ids, want)):
            self._fast = None
            print(f"[preprocess] gigatoken's ids differ from tokenizers' for {self.path}: "
                  "tokenizing with tokenizers", file=sys.stderr)  # fmt: skip

    def _fast_ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # On the calling thread: a worker is one core (its thread pool costs ~15% more CPU).
        layout = self._fast.encode_batch(texts, parallel=False).layout  # awkward: offsets, content
        offsets = np.asarray(layout.offsets.data, dtype=np.int64)
        return np.asarray(layout.content.data)[offsets[0] : offsets[-1]], np.diff(offsets)

    def _hf_ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)  # no offsets
        ids = [e.ids for e in encode(texts, add_special_tokens=False)]
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        return np.fromiter(
            itertools.chain.from_iterable(ids), np.uint32, int(lengths.sum())
        ), lengths

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.zeros(0, np.uint32), np.zeros(0, np.int64)
        if self._first:
            self._first = False
            chars = itertools.accumulate(map(len, texts[:CHECK_TEXTS]))
            n = 1 + sum(1 for c in chars if c < CHECK_CHARS)  # (texts up to the one that passes)
            self._keep_fast_if_it_agrees(texts[: min(n, CHECK_TEXTS)])
        return self._hf_ids(texts) if self._fast is None else self._fast_ids(texts)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, instead of usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def _print_summary(tok, out_dir, extra: str = "") -> None:
    ids = special_token_ids(tok)
    print(
        f"tokenizer saved to {out_dir}: vocab_size={len(tok)}{extra}\n"
        f"  special ids: bos={ids['bos']} eos={ids['eos']} pad={ids['pad']} unk={ids['unk']}"
        f" view_sep={ids['view_sep']} predictors={ids['predictors']}\n"
        f"  hash: {tokenizer_hash(out_dir)}"
    )


def _cmd_train(args) -> None:
    try:
        from data_pipeline.sources import iter_view_texts
    except ImportError as e:
        raise ImportError(f"cannot import data_pipeline.sources.iter_view_texts: {e}") from None
    skipped: Counter = Counter()
    examples: list[str] = []  # the first few skips (as preprocess) and every damaged file

    def on_skip(location, err) -> None:
        skipped[err.reason] += 1
        if len(examples) < 5 or err.ends_file:
            examples.append(err.describe(location))

    texts = iter_view_texts(args.inputs, args.views, args.system_prompt, on_skip=on_skip)
    stream = _TextStream(texts)
    tok = train_tokenizer(
        stream, args.out, args.vocab_size, args.num_predictor_tokens, args.max_sentences, args.seed
    )
    _print_summary(tok, args.out, f", trained on {stream.count} texts")
    if skipped:
        print(f"  skipped {skipped.total()} records {dict(skipped)}")
        for line in examples:
            print(f"  skipped {line}")


def _cmd_extend(args) -> None:
    tok = extend_tokenizer(args.src, args.out, args.num_predictor_tokens)
    _print_summary(tok, args.out, f", extended from {args.src}")


def main(argv: list[str] | None = None) -> None:
    parser = _ArgumentParser(
        prog="python -m data_pipeline.tokenizer", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    train = commands.add_parser("train", help="train a SentencePiece BPE tokenizer on view texts")
    train.add_argument("--inputs", nargs="+", required=True, help="input files or globs")
    train.add_argument("--views", required=True, help="view spec, as in data_pipeline.sources")
    train.add_argument("--out", required=True, help="output tokenizer directory")
    train.add_argument("--vocab_size", type=int, default=8000, help="total, specials included")
    train.add_argument("--system_prompt", choices=("drop", "prefix"), default="drop")
    train.add_argument("--max_sentences", type=int, default=2_000_000, help="texts sampled")
    train.add_argument("--seed", type=int, default=0)
    extend = commands.add_parser("extend", help="add missing special tokens to an HF tokenizer")
    extend.add_argument("--src", required=True, help="local HF tokenizer directory")
    extend.add_argument("--out", required=True, help="output tokenizer directory")
    for sub in (train, extend):
        sub.add_argument("--num_predictor_tokens", type=int, default=DEFAULT_NUM_PREDICTOR_TOKENS)

    args = parser.parse_args(argv)
    try:
        {"train": _cmd_train, "extend": _cmd_extend}[args.command](args)
    except (ValueError, OSError, ImportError) as e:
        # Bad input or configuration: one line, no traceback.
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
