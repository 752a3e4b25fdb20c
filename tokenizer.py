"""The checkpoint's tokenizer: text <-> token ids, on tiktoken's byte-level BPE.

    python tokenizer.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf "The pass key is 81501."

One class, one loader. `load_tokenizer` reads what comes with the model:
- a .gguf file: the vocabulary llama.cpp stores (tokens, merges, special ids, pre-tokenizer name);
- a Hugging Face tokenizer.json holding a byte-level BPE (SmolLM2, Llama-3 ...);
- a Llama-3 tokenizer.model (tiktoken format: "base64-token rank" per line);
- a Llama-1/2 tokenizer.model (a SentencePiece model, through the optional sentencepiece package);
- or a directory holding one of them.
A byte-level BPE becomes a tiktoken.Encoding whose rank of each token IS its id in the model; that
is exact when the ids follow the merge order (checked on load), because tiktoken merges the pair
whose result has the lowest rank. Special-token text (e.g. "<|im_end|>") in `encode`'s input is
plain text, as tiktoken's encode_ordinary does; a Hugging Face tokenizer matches it as the special
token unless called with split_special_tokens=True (which `save` writes into tokenizer_config.json).
"""
import base64
import json
from pathlib import Path

import regex
import tiktoken

# Pre-tokenizers: the regex that cuts text into pieces before BPE merges inside each piece.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Hugging Face's Digits(individual_digits) then ByteLevel, in one regex: every digit alone, and a
# whitespace run may end before a digit (that is where Digits cut the text). SmolLM2's tokenizer.json.
DIGITS_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# tokenizer.ggml.pre -> pattern, as transformers builds the tokenizer of a GGUF file. For "smollm"
# llama.cpp isolates every digit first (DIGITS_GPT2_PATTERN, like SmolLM2's own tokenizer.json);
# transformers uses GPT-2's regex alone. They differ only where two or more whitespace characters
# precede a digit ("\n\n1": transformers "\n" "\n" "1", llama.cpp "\n\n" "1"). We follow transformers.
GGUF_PATTERNS = {"gpt2": GPT2_PATTERN, "smollm": GPT2_PATTERN, "llama-bpe": LLAMA3_PATTERN,
                 "llama3": LLAMA3_PATTERN, "llama-v3": LLAMA3_PATTERN, "smaug-bpe": LLAMA3_PATTERN}
# Meta's Llama 3.1 tokenizer.model has no special tokens inside; they follow its 128,000 ranks.
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                         "<|python_tag|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, in which byte-level vocabularies write their tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


class Tokenizer:
    """A byte-level BPE: `ranks` maps token bytes to ids, `special_tokens` maps text to ids."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str, *,
                 bos_id: int | None, eos_id: int | None, add_bos: bool, merges=None, name="bpe"):
        self.ranks, self.special_tokens, self.pattern = ranks, special_tokens, pattern
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.merges = merges  # [(left bytes, right bytes)] best first, when the vocabulary lists them
        self.encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        self.n_vocab = self.encoding.n_vocab
        # Bytes with no token of their own (SmolLM2 lacks 21, e.g. 0x04). tiktoken cannot encode them;
        # Hugging Face drops them from their piece, and so do we.
        self.unspellable = bytes(b for b in range(256) if bytes([b]) not in ranks)

    def encode(self, text: str, *, bos: bool | None = None) -> list[int]:
        if self.add_bos if bos is None else bos:
            assert self.bos_id is not None, "this tokenizer has no BOS token"
            return [self.bos_id, *self.encode(text, bos=False)]
        utf8 = text.encode("utf-8", "replace")
        if not self.unspellable or len(utf8.translate(None, self.unspellable)) == len(utf8):
            return self.encoding.encode_ordinary(text)
        pieces = (piece.encode("utf-8", "replace").translate(None, self.unspellable) for piece in regex.findall(self.pattern, text))
        return [i for piece in pieces if piece for i in self.encoding._encode_single_piece(piece)]

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    def save(self, directory) -> None:
        """Write tokenizer.json and tokenizer_config.json, which transformers.AutoTokenizer reads too."""
        spell = byte_alphabet()
        text = lambda token: "".join(spell[b] for b in token)  # noqa: E731
        special = {i: s for s, i in self.special_tokens.items()}
        added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for s, i in sorted(self.special_tokens.items(), key=lambda x: x[1])]
        bos = special.get(self.bos_id)
        template = lambda seq, type_id: ([{"SpecialToken": {"id": bos, "type_id": type_id}}] if self.add_bos else []) + [  # noqa: E731
            {"Sequence": {"id": seq, "type_id": type_id}}]
        tokenizer = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": {"type": "TemplateProcessing", "single": template("A", 0),
                               "pair": template("A", 0) + template("B", 1),
                               "special_tokens": {bos: {"id": bos, "ids": [self.bos_id], "tokens": [bos]}} if self.add_bos else {}},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": True,  # a piece that is a whole token stays whole, as in tiktoken
                      "vocab": {text(token): i for token, i in self.ranks.items()},
                      "merges": [[text(a), text(b)] for a, b in self.merges or implied_merges(self.ranks)]},
        }
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": special.get(self.eos_id),
                  "add_bos_token": self.add_bos, "add_eos_token": False, "split_special_tokens": True,
                  "clean_up_tokenization_spaces": False}
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
        (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))


class SentencePieceTokenizer(Tokenizer):
    """Llama-1/2: a SentencePiece BPE (not byte-level), run by the sentencepiece package."""

    def __init__(self, model_file: Path, processor):
        self.model_file, self.processor = model_file, processor
        self.n_vocab, self.add_bos = processor.vocab_size(), True  # Meta's Llama-1/2 always start with BOS
        self.bos_id, self.eos_id = [i if i >= 0 else None for i in (processor.bos_id(), processor.eos_id())]

    def encode(self, text: str, *, bos: bool | None = None) -> list[int]:
        return ([self.bos_id] if (self.add_bos if bos is None else bos) else []) + self.processor.encode(text)

    def decode(self, ids) -> str:
        return self.processor.decode(list(ids))

    def save(self, directory) -> None:
        """Copy tokenizer.model; transformers converts it to its LlamaTokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.model").write_bytes(self.model_file.read_bytes())
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": self.processor.id_to_piece(self.bos_id),
                  "eos_token": self.processor.id_to_piece(self.eos_id), "add_bos_token": True,
                  "add_eos_token": False, "split_special_tokens": True, "clean_up_tokenization_spaces": False}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def implied_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges a tiktoken vocabulary implies: every split of a token into two tokens, by the token's rank."""
    merges = [(rank, ranks[token[:i]], ranks[token[i:]], token[:i], token[i:]) for token, rank in ranks.items()
              for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
    return [(left, right) for *_, left, right in sorted(merges)]


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer in `path`: a .gguf, tokenizer.json or tokenizer.model file, or a directory with one."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ("tokenizer.model", "tokenizer.json") if (path / name).is_file()]
        if not found:
            raise ValueError(f"{path} holds no tokenizer.model or tokenizer.json; expected a directory with one of them.")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"{path} does not exist; expected a .gguf, tokenizer.json or tokenizer.model file, or a directory with one.")
    if path.suffix == ".gguf":
        return _from_gguf(path)
    if path.suffix == ".json":
        return _from_tokenizer_json(path)
    return _from_tokenizer_model(path)


def _from_byte_level(path, tokens: dict[str, int], merges, special: set[str], pattern, **kwargs) -> Tokenizer:
    """A byte-level BPE's vocabulary (tokens spelled in `byte_alphabet`) and merges, as tiktoken ranks."""
    unspell = {c: b for b, c in byte_alphabet().items()}
    try:
        ranks = {bytes(unspell[c] for c in token): i for token, i in tokens.items() if token not in special}
    except KeyError:
        raise ValueError(f"{path}: the vocabulary is not a byte-level BPE (a token uses a character outside GPT-2's byte alphabet).")
    # tiktoken merges the pair whose result has the lowest rank, Hugging Face the pair listed first:
    # the same choice when the ids of the merges' results never decrease down the list.
    previous, pairs = 0, []
    for left, right in merges:
        merged = tokens.get(left + right, -1)
        if merged < previous or left not in tokens or right not in tokens:
            raise ValueError(f"{path}: the merge {left} + {right} breaks the rule that merges make tokens in id order, "
                             "so the ids cannot serve as tiktoken ranks.")
        previous = merged
        pairs.append((bytes(unspell[c] for c in left), bytes(unspell[c] for c in right)))
    return Tokenizer(ranks, {s: tokens[s] for s in special}, pattern, merges=pairs, name=path.stem, **kwargs)


def _from_gguf(path: Path) -> Tokenizer:
    import gguf

    try:
        fields = {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items() if name.startswith("tokenizer.ggml.")}
    except Exception as error:  # the gguf package raises assorted errors on a damaged file
        raise ValueError(f"{path} is not a readable GGUF file ({error}).") from error
    get = lambda key, default=None: fields.get(f"tokenizer.ggml.{key}", default)  # noqa: E731
    if get("model") != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {get('model')!r}; expected 'gpt2' (a byte-level BPE); "
                         "for a SentencePiece vocabulary load the model's tokenizer.model instead.")
    if get("pre", "gpt2") not in GGUF_PATTERNS:
        raise ValueError(f"{path}: unknown pre-tokenizer tokenizer.ggml.pre={get('pre')!r}; known: {sorted(GGUF_PATTERNS)}.")
    tokens = get("tokens")
    special = {token for token, kind in zip(tokens, get("token_type")) if kind == 3}  # 3: CONTROL
    merges = [merge.split(" ") for merge in get("merges")]
    return _from_byte_level(path, {t: i for i, t in enumerate(tokens)}, merges, special, GGUF_PATTERNS[get("pre", "gpt2")],
                            bos_id=get("bos_token_id"), eos_id=get("eos_token_id"), add_bos=bool(get("add_bos_token", False)))


def _from_tokenizer_json(path: Path) -> Tokenizer:
    try:
        spec = json.loads(path.read_text())
        config_file = path.with_name("tokenizer_config.json")
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable tokenizer.json ({error}).") from error
    if not isinstance(spec, dict) or (spec.get("model") or {}).get("type") != "BPE":
        raise ValueError(f"{path}: expected a Hugging Face tokenizer.json whose model is a byte-level BPE.")
    pre = spec.get("pre_tokenizer") or {}
    steps = [(step["type"], step) for step in pre.get("pretokenizers", [pre])]
    kinds = [kind for kind, _ in steps]
    if kinds == ["ByteLevel"] and steps[0][1].get("use_regex", True):
        pattern = GPT2_PATTERN
    elif kinds == ["Digits", "ByteLevel"] and steps[0][1].get("individual_digits") and steps[1][1].get("use_regex", True):
        pattern = DIGITS_GPT2_PATTERN
    elif kinds == ["Split", "ByteLevel"] and "Regex" in steps[0][1]["pattern"] and not steps[1][1].get("use_regex", True):
        pattern = steps[0][1]["pattern"]["Regex"]
    else:
        raise ValueError(f"{path}: unknown pre-tokenizer {kinds}; expected ByteLevel, Digits + ByteLevel or Split + ByteLevel.")
    special = {token["content"]: token["id"] for token in spec.get("added_tokens", [])}
    tokens = {**spec["model"]["vocab"], **special}
    merges = [merge.split(" ") if isinstance(merge, str) else merge for merge in spec["model"]["merges"]]
    name = lambda key: (config.get(key) or {}).get("content") if isinstance(config.get(key), dict) else config.get(key)  # noqa: E731
    template = (spec.get("post_processor") or {}).get("single") or [{}]
    return _from_byte_level(path, tokens, merges, set(special), pattern, bos_id=special.get(name("bos_token")),
                            eos_id=special.get(name("eos_token")), add_bos=config.get("add_bos_token", "SpecialToken" in template[0]))


def _from_tokenizer_model(path: Path) -> Tokenizer:
    data = path.read_bytes()
    try:  # Llama-3: "base64-token rank" per line, ranks 0..n-1
        ranks = {base64.b64decode(token, validate=True): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    except ValueError:  # binascii.Error too: not base64 text, so a SentencePiece protobuf, or garbage
        ranks = None
    if not ranks:
        return _from_sentencepiece(path)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the tiktoken ranks are not 0..{len(ranks) - 1}, one per token.")
    special = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
    return Tokenizer(ranks, special, LLAMA3_PATTERN, bos_id=special["<|begin_of_text|>"],
                     eos_id=special["<|end_of_text|>"], add_bos=True, name=path.stem)


def _from_sentencepiece(path: Path) -> Tokenizer:
    try:
        import sentencepiece
    except ImportError as error:
        raise ValueError(f"{path} is a SentencePiece model (Llama-1/2); `pip install sentencepiece` to read it.") from error
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as error:
        raise ValueError(f"{path} is neither a tiktoken BPE file (base64 token and rank per line) nor a SentencePiece model.") from error
    return SentencePieceTokenizer(path, processor)


if __name__ == "__main__":
    import sys

    tokenizer = load_tokenizer(sys.argv[1])
    ids = tokenizer.encode(" ".join(sys.argv[2:]))
    print(f"{len(ids)} tokens (vocabulary {tokenizer.n_vocab}, BOS {'added' if tokenizer.add_bos else 'not added'}):", ids)
