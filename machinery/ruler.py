"""RULER's synthetic tasks (Hsieh et al. 2024, arXiv 2404.06654, NVIDIA/RULER's
scripts/data/synthetic and scripts/eval): needles in a haystack and variable tracking, with their
templates, needles, keys and values, depths and scoring, for eval_ruler.py.

    from machinery.ruler import Prompts
    sample = Prompts(tokenizer).sample("niah_multikey_1", length=4096, index=0)
    sample["prompt"], sample["references"], sample["prompt_tokens"] + sample["generate"]  # ≤ 4096

A needle is "One of the special magic numbers for {key} is: {value}."; keys are adjective-noun
pairs from the wonderwords package's lists (RULER's own source) or uuids; values 7-digit numbers,
words or uuids. Haystacks: `noise`, one sentence repeated; `essay`, real prose, a needle placed
between sentences at a depth drawn from 40 evenly spaced ones; `needle`, distractor needles with
other keys. Each prompt is fitted to its length the way RULER fits it (the largest haystack, in
RULER's units: sentences, essay words or distractors, for which prompt + tokens to generate ≤ the
length), counted exactly in the model's own tokens, BOS included; only the counting is faster:
each probe of the search adds remembered token counts of the prompt's pieces (sentences,
needles, template parts), and only the prompts the search lands on are encoded whole.

Where we differ from RULER, none of it in the prompts' words: the essay is Jane Austen's Emma
(public domain, in no fine-tuning set here: those hold Shakespeare; RULER uses Paul Graham's
essays) and its sentences are cut by a short rule (RULER uses NLTK's punkt); a sample draws its
keys, values and depths once, from (seed, task, length, index), and then fits its haystack (RULER
draws anew at each probe); no key or value is drawn twice in a sample or found in its haystack,
so the question's key stands once per needle (RULER does not check); word keys pair an adjective
and a noun drawn apart (the same uniform choice over RULER's list of all pairs, without building
its 6 million strings).
"""
import bisect
import random
import re
import string
import uuid
from importlib import resources

from errors import UserError
from machinery.texts import fetch_austen

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)), in %
# (template, answer prefix), RULER's scripts/data/synthetic/constants.py
NIAH = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to "
        "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
        "What are all the special magic {type_needle_v} for {query} mentioned in the provided "
        "text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are")
VT = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
      "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
      "above.", " Answer: According to the chain(s) of variable assignment in the text above, "
      "{num_v} variables are assigned the value {query}, they are: ")
# RULER's scripts/data/template.py, those in plain text (our tokenizer reads "<|...|>" as text)
CHAT = {"base": "{task_template}", "meta-chat": "[INST] {task_template} [/INST]",
        "vicuna-chat": "A chat between a curious user and an artificial intelligence assistant. "
                       "The assistant gives helpful, detailed, and polite answers to the user's "
                       "questions. USER: {task_template} ASSISTANT:",
        "lwm-chat": "You are a helpful assistant. USER: {task_template} ASSISTANT: "}
# RULER's scripts/synthetic.yaml: haystack, key and value kinds, needles (k keys × v values each),
# q keys asked; vt: one chain of four hops in noise
TASKS = {"niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
         "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
         "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
         "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
         "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
         "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
         "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
         "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
         "vt": ("noise", None, None, 1, 4, 1)}
GENERATE = {"niah": 128, "vt": 30}  # tokens to generate, counted in the length
ICL_TOKENS = 500  # vt's worked example is fitted to this many tokens, as RULER does


def words(name):
    """A wonderwords list (nounlist.txt, adjectivelist.txt), sorted, without repeats."""
    try:
        text = resources.files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise UserError("RULER's word keys come from the wonderwords package: pip install "
                        "wonderwords==3.0.1 (pyproject.toml's extra).") from None
    return sorted({line.rstrip() for line in text.splitlines()} - {""})


def essay_sentences(novel="emma"):
    """The novel's prose as sentences, its whitespace made single spaces (RULER's
    `re.sub(r'\\s+', ' ', essay)`), without its title page, headings and italics marks."""
    text = fetch_austen(novel=novel).read_text(encoding="utf-8")
    text = text[text.index("CHAPTER I"):].replace("_", "")
    text = re.sub(r"^(VOLUME|CHAPTER) [IVXLC]+$", " ", text, flags=re.M)
    return split_sentences(re.sub(r"\s+", " ", text).strip().split(" "))


def split_sentences(words):
    """Words -> sentences (strings): a word ending in . ! or ? (closing quotes allowed) ends one
    when the next begins with a capital or a quote, unless it is a title (Mr.) or an initial."""
    sentences, start = [], 0
    for i, word in enumerate(words[:-1]):
        ends = re.search(r"[.!?][\"')]*$", word) and re.match(r"[\"'(]?[A-Z]", words[i + 1])
        if ends and not re.fullmatch(r"[\"'(]?(Mr|Mrs|Dr|St|Messrs|Col|[A-Z])\.", word):
            sentences.append(" ".join(words[start:i + 1]))
            start = i + 1
    return sentences + [" ".join(words[start:])] if words[start:] else sentences


def largest_from(fits, guess):
    """The largest n ≥ 0 with fits(n), for fits true up to some n and false after (fits(0) true):
    outward from `guess` by doubling steps, then a binary search; O(log |n − guess|) calls."""
    if fits(guess):
        lo, step = guess, 1
        while fits(lo + step):
            lo, step = lo + step, step * 2
        hi = lo + step
    else:
        hi, step = guess, 1
        while not fits(max(hi - step, 0)):
            hi, step = hi - step, step * 2
        lo = max(hi - step, 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def postprocess(prediction):
    """RULER's postprocess_pred (scripts/eval/evaluate.py): control characters become newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(predictions, references):
    """RULER's score: the fraction of each sample's references found in its prediction (case
    aside), averaged over the samples, × 100, to 2 decimals."""
    found = [sum(r.lower() in p.lower() for r in refs) / len(refs)
             for p, refs in zip(predictions, references)]
    return round(sum(found) / len(predictions) * 100, 2)


def spots(seed, n, k):
    """RULER's random.sample(range(n), k), the places of k needles among n sentences, drawn from
    `seed` (for n < k, where RULER's sample would fail: all at the start)."""
    return random.Random(seed).sample(range(n), k) if n >= k else [0] * k


def join(parts, sep):
    """sep.join(parts) as pieces, each part with the separator before it (as it is tokenized)."""
    return [part if i == 0 else sep + part for i, part in enumerate(parts)]


class Prompts:
    """RULER's prompts for one tokenizer: the essay read once, each piece's token count kept."""

    def __init__(self, tokenizer, template="base", seed=0, novel="emma"):
        if template not in CHAT:
            raise UserError(f"unknown --template {template!r}; choose one of {', '.join(CHAT)}.")
        self.tokenizer, self.chat, self.seed, self.novel = tokenizer, CHAT[template], seed, novel
        self.counts, self.bos = {}, len(tokenizer.encode(""))
        self._essay = self._icl = self._words = None

    def count(self, pieces):
        """The tokens of "".join(pieces), estimated as the sum of each piece's own (BOS added)."""
        for piece in pieces:
            if piece not in self.counts:
                self.counts[piece] = len(self.tokenizer.encode(piece, bos=False))
        return self.bos + sum(self.counts[piece] for piece in pieces)

    def fit(self, build, length, generate, what):
        """The largest haystack n with len(encode("".join(build(n)))) + generate ≤ length: found
        on count()'s estimates, scaled by their error at the first guess, then settled by
        encoding the prompts next to it (2 or 3 of them when the estimate is right)."""
        budget, exact = length - generate, {}

        def tokens(n):
            if n not in exact:
                exact[n] = len(self.tokenizer.encode("".join(build(n))))
            return exact[n]

        if tokens(0) > budget:
            raise UserError(f"{what} needs {tokens(0) + generate} tokens with no haystack at all "
                            f"({generate} of them to generate); length {length} is too short.")
        guess, scale = 0, 1.0
        for _ in range(2):  # the second pass corrects the estimate by its error at the first
            if self.count(build(guess)) * scale <= budget:
                guess = largest_from(lambda n: self.count(build(n)) * scale <= budget, guess)
            scale = tokens(guess) / self.count(build(guess))
        return largest_from(lambda n: tokens(n) <= budget, guess)

    def draw(self, kind, rng, taken, text=""):
        """A key or value RULER's way (words: adjective-noun; numbers: 7 digits; uuids), one not in
        `taken` (this sample's keys and values so far; it is added) nor in `text` (lower case)."""
        while True:
            if kind == "words":
                self._words = self._words or (words("adjectivelist.txt"), words("nounlist.txt"))
                value = f"{rng.choice(self._words[0])}-{rng.choice(self._words[1])}"
            elif kind == "numbers":
                value = str(rng.randint(10**6, 10**7 - 1))
            else:
                value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            if value not in taken and value.lower() not in text:
                taken.add(value)
                return value

    def essay(self):
        """(sentences, cumulative word counts, the text in lower case), read once."""
        if self._essay is None:
            sentences = essay_sentences(self.novel)
            ends, n = [], 0
            for s in sentences:
                n += s.count(" ") + 1
                ends.append(n)
            self._essay = sentences, ends, " ".join(sentences).lower()
        return self._essay

    def essay_words(self, n):
        """RULER's sent_tokenize(" ".join(words[:n])): the first n words (the essay repeated as
        often as needed) as sentences, the last one cut."""
        sentences, ends, _ = self.essay()
        copies, rest = divmod(n, ends[-1])
        k = bisect.bisect_right(ends, rest)
        cut = rest - (ends[k - 1] if k else 0)
        partial = [" ".join(sentences[k].split(" ")[:cut])] if cut else []
        return sentences * copies + sentences[:k] + partial

    def template(self, task_template, answer_prefix):
        """RULER's prepare.py: the chat template around the task's, then the answer prefix."""
        return self.chat.format(task_template=task_template) + answer_prefix

    def sample(self, task, length, index):
        """One sample of `task` fitted to `length` tokens -> dict (prompt, tokens, references …)."""
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}; RULER's synthetic tasks here: "
                            f"{', '.join(TASKS)}.")
        rng = random.Random(f"{self.seed}:{task}:{length}:{index}")
        make = self.variable_tracking if task == "vt" else self.needles
        sample = make(task, length, index, rng)
        sample["tokens"] = self.tokenizer.encode(sample["prompt"])
        sample["prompt_tokens"] = len(sample["tokens"])
        return {"task": task, "length": length, "index": index} | sample

    def needles(self, task, length, index, rng):
        """RULER's niah.py generate_input_output, its draws made once."""
        haystack, key_kind, value_kind, n_keys, n_values, n_queries = TASKS[task]
        taken, keys, values, needles = set(), [], [], []
        text = self.essay()[2] if haystack == "essay" else ""
        for _ in range(max(n_keys, n_queries)):
            keys.append(self.draw(key_kind, rng, taken, text))
            values.append([self.draw(value_kind, rng, taken, text) for _ in range(n_values)])
            needles += [NEEDLE.format(type_needle_v=value_kind, key=keys[-1], value=v)
                        for v in values[-1]]
        rng.shuffle(needles)
        depths = rng.sample(DEPTHS, len(needles))  # the essay's; noise and needles: rng below
        asked = rng.sample(range(len(keys)), n_queries)
        queries, references = [keys[i] for i in asked], [v for i in asked for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if n_queries > 1 else queries[0]
        template, type_v = self.template(*NIAH), value_kind
        if n_queries * n_values == 1:  # RULER's singular forms for one value asked
            for plural, singular in (("Some", "A"), ("are all", "is"), ("are", "is"),
                                     ("answers", "answer")):
                template = template.replace(plural, singular)
            type_v = value_kind[:-1]
        head, tail = (part.format(type_needle_v=type_v, query=query)
                      for part in template.split("{context}"))
        distractors, placed = [], {}
        salt = f"{self.seed}:{task}:{length}:{index}"
        haystack_rng = random.Random(salt + ":haystack")

        def build(n):
            if haystack == "essay":
                sentences = self.essay_words(n)
                cuts = [int(len(sentences) * (d / 100)) for d in sorted(depths)]  # RULER's floats
                cuts = [0, *cuts, len(sentences)]
                parts = []  # RULER's document_sents_list, each entry as its pieces
                for i in range(1, len(cuts)):
                    parts.append(join(sentences[cuts[i - 1]:cuts[i]], " ") or [""])
                    if i - 1 < len(needles):
                        parts.append([needles[i - 1]])
                pieces = []  # " ".join(document_sents_list)
                for i, part in enumerate(parts):
                    pieces += [(" " if i else "") + part[0], *part[1:]]
                placed["depths"] = sorted(depths)
                return [head, *pieces, tail]
            while haystack == "needle" and len(distractors) < n:
                distractors.append(NEEDLE.format(
                    type_needle_v=value_kind, key=self.draw(key_kind, haystack_rng, taken),
                    value=self.draw(value_kind, haystack_rng, taken)))
            sentences = [NOISE] * n if haystack == "noise" else distractors[:n]
            at = sorted(spots(f"{salt}:{n}", n, len(needles)), reverse=True)
            for position, needle in zip(at, needles):
                sentences.insert(position, needle)
            placed.update(positions=at, depths=[round(100 * p / max(n, 1)) for p in at])
            return [head, *join(sentences, "\n"), tail]

        n = self.fit(build, length, GENERATE["niah"], task)
        prompt = "".join(build(n))  # and `placed` holds its needles' depths
        return {"prompt": prompt, "references": references, "generate": GENERATE["niah"],
                "haystack": n, "queries": queries, "needles": needles, **placed}

    def chain(self, rng, letters, value, hops=4):
        """RULER's generate_chains (one chain): distinct variable names, the first bound to the
        value, each next to the one before."""
        names = []
        while len(names) < hops + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            names += [name] if name not in names else []
        lines = [f"VAR {names[0]} = {value}"]
        return names, lines + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]

    def variable_tracking(self, task, length, index, rng, example=True):
        """RULER's variable_tracking.py: the chain's lines in noise, after one worked example of
        about ICL_TOKENS tokens (its names and value drawn anew for each sample)."""
        value = str(rng.randint(10000, 99999)) if example else "12345"
        names, chain = self.chain(rng, 5 if example else 3, value)
        template = self.template(*VT) if example else VT[0] + VT[1]
        head, tail = (part.format(query=value, num_v=len(names))
                      for part in template.split("{context}"))
        if example:
            icl = self.example()
            for name in icl.strip().split()[-len(names):]:  # RULER's randomize_icl
                icl = icl.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
            icl = icl.replace("12345", str(rng.randint(10000, 99999)))
            cut = head.index(VT[0][:20])
            head = head[:cut] + icl + "\n" + head[cut:]
        salt = f"{self.seed}:{task}:{length}:{index}"

        placed = {}

        def build(n):
            sentences = [NOISE] * n
            at = sorted(spots(f"{salt}:{n}", n, len(chain)))
            for j, position in enumerate(at):
                sentences.insert(position + j, chain[j])
            # RULER's context.replace(". \n", ".\n") changes nothing here: no line ends in ". "
            placed.update(positions=at, depths=[round(100 * p / max(n, 1)) for p in at])
            return [head, *join(sentences, "\n"), tail]

        generate = GENERATE["vt"] if example else 0
        n = self.fit(build, length, generate, "vt (with its worked example)" if example else
                     "vt's worked example")
        prompt = "".join(build(n))
        return {"prompt": prompt, "references": names, "generate": generate, "haystack": n,
                "queries": [value], "needles": chain, **placed}

    def example(self):
        """vt's worked example, drawn once: a 3-letter chain bound to 12345 in noise, fitted to
        ICL_TOKENS tokens, followed by its answer."""
        if self._icl is None:
            rng = random.Random(f"{self.seed}:vt:example")
            s = self.variable_tracking("vt", ICL_TOKENS, "example", rng, example=False)
            self._icl = s["prompt"] + " " + " ".join(s["references"]) + "\n"
        return self._icl
