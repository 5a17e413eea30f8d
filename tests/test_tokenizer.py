"""Tests for data_pipeline.tokenizer: SentencePiece training, HF equivalence, extension, CLI."""

import gzip
import json
import os
import random
import re
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest
import sentencepiece as spm

from data_pipeline.tokenizer import (
    SPM_FILE,
    VIEW_SEP,
    encode_views,
    extend_tokenizer,
    load_tokenizer,
    main,
    predictor_token,
    special_token_ids,
    tokenizer_hash,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
SYNTH = (
    REPO / "data" / "nlrx_synth" / "train.jsonl"
)  # = /work/shared/data/llm_jepa/synth_train.jsonl
VOCAB = 1000
EXTRA_UNICODE = [
    "Héllo wörld, café naïve façade — «quotes» ‘single’ “double”",
    "日本語のテキストを書きます。中文文本也在这里。한국어 텍스트입니다.",
    "Emoji 😀🚀🎉 👍🏽 👨‍👩‍👧 flags 🇫🇷🇯🇵",
    "Ελληνικά και русский текст, עברית, العربية, हिन्दी",
    "def f(x):\n    return x  # indented code\n\tif tab:\n\t\tpass\n",
    "Numbers 1234567890 3.14159 -42 1e10 0x1F",
]
# Pieces for random strings: whitespace runs, unicode, digits, combining marks, astral chars.
ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789.,;:!?()[]{}<>|*+-=/\\'\"_#@$%^&~`") + [
    " ", "  ", "    ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "é", "ñ", "ü", "ß", "e\u0301",
    "日本", "中文", "한국", "😀", "👍🏽", "👨‍👩‍👧", "Ω", "∑", "𝔘", "\u200b", "<s>", "</s>",
    VIEW_SEP, "<|predictor_1|>", "<pad>", "<unk>", "the", " string", "dog", "lines",
]  # fmt: skip


def synth_texts(limit=None):
    texts = []
    with SYNTH.open() as f:
        for line in f:
            for message in json.loads(line)["messages"]:
                if message["role"] in ("user", "assistant"):
                    texts.append(message["content"])
            if limit and len(texts) >= limit:
                break
    return texts


def corpus():
    return synth_texts() + EXTRA_UNICODE * 20


def probe_strings():
    """>= 1000 strings: corpus lines, random mixtures and edge cases (empty, only whitespace, ...)."""
    rng = random.Random(0)
    strings = ["", " ", "  ", "\n", "\t", " leading", "trailing ", "  both  ", "a\n\nb", "0", "007"]
    strings += EXTRA_UNICODE + synth_texts()[:500]
    strings += ["".join(rng.choices(ALPHABET, k=rng.randint(1, 40))) for _ in range(600)]
    return strings


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus(), out, vocab_size=VOCAB)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def sp(tok_dir):
    return spm.SentencePieceProcessor(model_file=str(tok_dir / SPM_FILE))


def test_special_ids_are_fixed(tok, sp):
    assert special_token_ids(tok) == {
        "unk": 0, "bos": 1, "eos": 2, "pad": 3, "view_sep": 4, "predictors": list(range(5, 13))
    }  # fmt: skip
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
    )
    assert len(tok) == sp.get_piece_size() == VOCAB
    assert [sp.id_to_piece(i) for i in range(13)] == tok.convert_ids_to_tokens(list(range(13)))
    assert all(sp.is_control(i) for i in range(1, 13))


def test_loads_offline_as_fast_tokenizer(tok_dir, tok):
    code = (
        "import sys, json\n"
        "from transformers import AutoTokenizer, PreTrainedTokenizerFast\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "assert isinstance(t, PreTrainedTokenizerFast) and t.is_fast, type(t)\n"
        "print(json.dumps([t.bos_token_id, t.eos_token_id, t.pad_token_id, t.unk_token_id,"
        " t.extra_special_tokens, t('héllo  wörld 42', add_special_tokens=False)['input_ids']]))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", code, str(tok_dir)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    bos, eos, pad, unk, extras, ids = json.loads(result.stdout.strip().splitlines()[-1])
    assert (bos, eos, pad, unk) == (1, 2, 3, 0)
    assert extras == [VIEW_SEP] + [predictor_token(i) for i in range(1, 9)]
    assert ids == tok("héllo  wörld 42", add_special_tokens=False)["input_ids"]


def test_hf_ids_equal_sentencepiece_ids(tok, sp):
    strings = probe_strings()
    assert len(strings) >= 1000
    expected = sp.encode(strings)
    assert encode_views(tok, strings) == expected
    assert tok(strings, add_special_tokens=False)["input_ids"] == expected
    # No BOS/EOS even when transformers is asked to add special tokens.
    assert tok(strings[:50])["input_ids"] == expected[:50]
    assert [] == encode_views(tok, [""])[0]


def test_decode_round_trips(tok, sp):
    strings = probe_strings()
    ids = encode_views(tok, strings)
    assert [tok.decode(x) for x in ids] == strings
    assert sp.decode(ids) == strings
    # Views encoded separately decode to their concatenation (no dummy-prefix space).
    assert tok.decode(ids[5] + ids[6] + ids[7]) == strings[5] + strings[6] + strings[7]


def test_u2581_decodes_as_space_like_sentencepiece(tok, sp):
    # "▁" is SentencePiece's escaped space: a literal one in text decodes as " " (no round trip).
    text = "a▁b c"
    assert encode_views(tok, [text])[0] == sp.encode(text)
    assert tok.decode(sp.encode(text)) == "a b c"


def test_literal_special_strings_stay_text(tok):
    text = f"{predictor_token(1)} {VIEW_SEP}<s></s><pad><unk>{predictor_token(8)}"
    special = set(range(13))
    for ids in (encode_views(tok, [text])[0], tok(text)["input_ids"], tok.encode(text)):
        assert ids and not special & set(ids)
    assert tok.decode(encode_views(tok, [text])[0]) == text


def test_newline_and_unseen_chars_use_byte_fallback(tmp_path):
    tok = train_tokenizer(synth_texts(limit=3000), tmp_path, vocab_size=400, num_predictor_tokens=2)
    assert "\n" not in tok.get_vocab() and "😀" not in tok.get_vocab()
    text = "a\nb\t😀\r\n  c"
    ids = encode_views(tok, [text])[0]
    assert tok.convert_tokens_to_ids("<0x0A>") in ids
    assert tok.decode(ids) == text
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / SPM_FILE))
    assert ids == sp.encode(text)


def test_training_is_deterministic(tmp_path):
    texts = synth_texts(limit=3000)
    a = train_tokenizer(texts, tmp_path / "a", vocab_size=500, max_sentences=1000, seed=3)
    b = train_tokenizer(texts, tmp_path / "b", vocab_size=500, max_sentences=1000, seed=3)
    assert (tmp_path / "a" / SPM_FILE).read_bytes() == (tmp_path / "b" / SPM_FILE).read_bytes()
    assert tokenizer_hash(tmp_path / "a") == tokenizer_hash(tmp_path / "b")
    assert a.get_vocab() == b.get_vocab()


def test_tokenizer_hash_stable_on_resave_and_changes_on_extend(tok_dir, tmp_path):
    load_tokenizer(tok_dir).save_pretrained(tmp_path / "resaved")
    assert tokenizer_hash(tmp_path / "resaved") == tokenizer_hash(tok_dir)
    extend_tokenizer(tok_dir, tmp_path / "more", num_predictor_tokens=9)
    assert tokenizer_hash(tmp_path / "more") != tokenizer_hash(tok_dir)
    with pytest.raises(FileNotFoundError):
        tokenizer_hash(tmp_path)


def test_missing_predictor_is_a_clear_error(tmp_path):
    tok = train_tokenizer(synth_texts(limit=2000), tmp_path, vocab_size=400, num_predictor_tokens=2)
    assert special_token_ids(tok)["predictors"] == [5, 6]
    with pytest.raises(ValueError, match=r"<\|predictor_3\|>.*extend"):
        special_token_ids(tok, num_predictor_tokens=8)


def test_extend_sentencepiece_tokenizer_keeps_ids(tmp_path):
    src = tmp_path / "src"
    small = train_tokenizer(synth_texts(limit=2000), src, vocab_size=400, num_predictor_tokens=2)
    tok = extend_tokenizer(src, tmp_path / "out", num_predictor_tokens=8)
    ids = special_token_ids(tok, num_predictor_tokens=8)
    assert ids["predictors"] == [5, 6] + list(range(400, 406))
    assert (ids["unk"], ids["bos"], ids["eos"], ids["pad"], ids["view_sep"]) == (0, 1, 2, 3, 4)
    assert len(tok) == 406
    old = small.get_vocab()
    assert {t: tok.get_vocab()[t] for t in old} == old
    text = "lines with <|predictor_5|> dog"
    assert encode_views(tok, [text]) == encode_views(small, [text])


def test_extend_gpt2_style_tokenizer(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        synth_texts(limit=2000), vocab_size=400, special_tokens=["<|endoftext|>"]
    )
    src = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    src.save_pretrained(tmp_path / "gpt2")
    old = load_tokenizer(tmp_path / "gpt2").get_vocab()
    assert load_tokenizer(tmp_path / "gpt2").pad_token is None

    tok = extend_tokenizer(tmp_path / "gpt2", tmp_path / "out")
    assert {t: tok.get_vocab()[t] for t in old} == old
    assert tok.bos_token == tok.eos_token == "<|endoftext|>"
    assert (tok.pad_token, tok.unk_token) == ("<pad>", "<unk>")
    ids = special_token_ids(tok)
    assert len(ids["predictors"]) == 8
    new_ids = {ids["pad"], ids["unk"], ids["view_sep"], *ids["predictors"]}
    assert new_ids == set(range(len(old), len(old) + 11))
    text = f"x {VIEW_SEP} {predictor_token(2)}<|endoftext|>"
    ids = encode_views(tok, [text])[0]
    assert not (new_ids | {tok.eos_token_id}) & set(ids)
    assert tok.decode(ids) == text


def test_encode_views_ignores_backend_padding_and_truncation(tok):
    backend = tok.backend_tokenizer
    text = "lines with a vowel and the string 'dog'"
    full = encode_views(tok, [text])[0]
    backend.enable_truncation(max_length=2)
    backend.enable_padding(length=64, pad_id=3)
    assert encode_views(tok, [text])[0] == full
    assert backend.encode_special_tokens  # the tokenizer's own setting survives the call


def test_train_propagates_source_errors(tmp_path):
    def broken():
        yield "some text"
        raise FileNotFoundError("no such file: corpus/x.jsonl")

    with pytest.raises(FileNotFoundError, match="corpus/x.jsonl"):
        train_tokenizer(broken(), tmp_path, vocab_size=400)
    with pytest.raises(ValueError, match="vocab_size must be > 269"):
        train_tokenizer(["abc"], tmp_path, vocab_size=269)
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_tokenizer(["", ""], tmp_path, vocab_size=400)
    with pytest.raises(ValueError, match="not one string"):
        train_tokenizer("abc", tmp_path, vocab_size=400)


def test_long_texts_are_kept_not_skipped(tmp_path):
    # SentencePiece would silently skip a text over max_sentence_length; we train on its prefix.
    long_text = " ".join(synth_texts(limit=4000))
    assert len(long_text.encode()) > 100_000
    tok = train_tokenizer([long_text], tmp_path, vocab_size=400, num_predictor_tokens=0)
    assert "▁the" in tok.get_vocab()
    assert special_token_ids(tok)["predictors"] == []


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def shim_sources(monkeypatch):
    """A stand-in for data_pipeline.sources.iter_view_texts: user + assistant texts of JSONL files."""

    def iter_view_texts(inputs, views, system_prompt="drop", on_skip=None):
        assert views == "messages" and system_prompt == "drop"
        for path in [inputs] if isinstance(inputs, str) else inputs:
            if not Path(path).is_file():
                raise FileNotFoundError(f"no input files match {path}")
            for line in Path(path).open():
                for m in json.loads(line)["messages"]:
                    if m["role"] != "system":
                        yield m["content"]

    monkeypatch.setitem(
        sys.modules, "data_pipeline.sources", types.SimpleNamespace(iter_view_texts=iter_view_texts)
    )


def test_cli_train_with_shim_sources(shim_sources, tmp_path, capsys):
    out = tmp_path / "tok"
    main(
        [
            "train",
            "--inputs",
            str(SYNTH),
            "--views",
            "messages",
            "--out",
            str(out),
            "--vocab_size",
            "500",
        ]
    )
    printed = capsys.readouterr().out
    assert "vocab_size=500" in printed and "trained on 16000 texts" in printed
    assert "predictors=[5, 6, 7, 8, 9, 10, 11, 12]" in printed
    assert special_token_ids(load_tokenizer(out))["view_sep"] == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--inputs", "missing.jsonl", "--views", "messages", "--out", "x"],
            "no input files match",
        ),
        (
            [
                "train",
                "--inputs",
                str(SYNTH),
                "--views",
                "messages",
                "--out",
                "x",
                "--vocab_size",
                "50",
            ],
            "vocab_size",
        ),
        (["extend", "--src", "does/not/exist", "--out", "x"], "tokenizer directory not found"),
        (["train", "--views", "messages", "--out", "x"], "--inputs"),
    ],
)
def test_cli_errors_exit_2_with_one_line(
    shim_sources, tmp_path, capsys, monkeypatch, argv, message
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_module_entry_point_extend(tok_dir, tmp_path):
    run = [sys.executable, "-m", "data_pipeline.tokenizer", "extend", "--src", str(tok_dir)]
    ok = subprocess.run(
        [*run, "--out", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "vocab_size=1000" in ok.stdout and "view_sep=4" in ok.stdout
    bad = subprocess.run(
        [*run, "--out", str(tmp_path / "y"), "--num_predictor_tokens", "-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().endswith("num_predictor_tokens must be >= 0, got -1")


def test_cli_train_with_real_sources(tmp_path, capsys):
    sources = pytest.importorskip(
        "data_pipeline.sources", reason="data_pipeline/sources.py not written yet"
    )
    if not hasattr(sources, "iter_view_texts"):
        pytest.skip("data_pipeline.sources.iter_view_texts not written yet")
    out = tmp_path / "tok"
    main(
        [
            "train",
            "--inputs",
            str(SYNTH),
            "--views",
            "messages",
            "--out",
            str(out),
            "--vocab_size",
            "500",
        ]
    )
    assert "vocab_size=500, trained on 16000 texts" in capsys.readouterr().out
    assert special_token_ids(load_tokenizer(out))["predictors"] == list(range(5, 13))
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "train",
                "--inputs",
                str(tmp_path / "none*.jsonl"),
                "--views",
                "messages",
                "--out",
                str(out),
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "none*.jsonl" in err and len(err.strip().splitlines()) == 1


def test_cli_train_reads_a_damaged_gzip_up_to_the_damage(tmp_path, capsys):
    """Before: EOFError traceback (cut-short .gz) or "error: Not a gzipped file" naming no file."""
    lines = SYNTH.read_bytes().splitlines(keepends=True)[:2000]
    data = gzip.compress(b"".join(lines))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    whole_lines = zlib.decompressobj(31).decompress(cut.read_bytes()).count(b"\n")
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_bytes(b"".join(lines[:10]))
    argv = ["train", "--inputs", str(cut), str(not_gzip), "--views", "messages",
            "--out", str(tmp_path / "tok"), "--vocab_size", "500"]  # fmt: skip
    main(argv)
    printed = capsys.readouterr().out.splitlines()
    assert f", trained on {2 * whole_lines} texts" in printed[0]  # user + assistant per record
    assert printed[-3:] == [
        "  skipped 2 records {'truncated_gzip': 1, 'bad_gzip': 1}",
        f"  skipped {cut}:{whole_lines + 1}: truncated_gzip: compressed data ends early "
        "(file cut short); the rest is lost",
        f"  skipped {not_gzip}:1: bad_gzip: Not a gzipped file (b'{{\"'); the rest of the file is lost",
    ]


def test_lone_surrogates_are_skipped_by_the_cli_and_named_by_the_api(tmp_path, capsys, tok):
    """A JSON escape like "\\ud800" without its pair. Before: "sentencepiece training failed: Unable
    to cast Python instance of type <class 'str'> to C++ type '?'" (CLI and train_tokenizer), and
    a `tokenizers` TypeError from encode_views; none named the input."""
    lines = SYNTH.read_text().splitlines()[:1000]
    bad = {
        "messages": [
            {"role": "user", "content": "abc \ud800"},
            {"role": "assistant", "content": "x"},
        ]
    }
    lines.insert(2, json.dumps(bad))  # written as the escape "\ud800"
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    main(["train", "--inputs", str(path), "--views", "messages", "--out", str(tmp_path / "tok"),
          "--vocab_size", "500"])  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    assert ", trained on 2000 texts" in printed[0]
    why = "lone surrogate U+D800 at character 4 (half of a UTF-16 pair, not text)"
    assert printed[-2:] == [
        "  skipped 1 records {'lone_surrogate': 1}",
        f"  skipped {path}:3: lone_surrogate: view 'user': {why}",
    ]
    with pytest.raises(ValueError, match=rf"^texts\[2\]: {re.escape(why)}$"):
        train_tokenizer(["some text", "", "abc \ud800"], tmp_path / "api", vocab_size=300)
    with pytest.raises(ValueError, match=r"^texts\[1\]: lone surrogate U\+DC00 at character 1 "):
        encode_views(tok, ["a", "b\udc00"])
