"""machinery/ruler.py and eval_ruler.py against RULER's own code (NVIDIA/RULER's scripts/data/
synthetic/niah.py, variable_tracking.py, their constants.py, scripts/eval/synthetic/constants.py):
the prompts RULER's code writes from the same draws, lengths fitted exactly in the model's tokens
(the largest haystack that fits), needles at their depths, the question's key once per needle, no
reference outside the needles, RULER's score; a 128k prompt in under 2 s; one-sentence errors."""
import json
import re
import time

import pytest
import torch

import eval_ruler
from conftest import byte_tokenizer
from machinery import ruler
from machinery.prefix import SharedPrefix
from machinery.ruler import TASKS, Prompts
from machinery.tokenizer import LLAMA3_PATTERN, SMOLLM2, Tokenizer, load_tokenizer, resolve
from model import ModelArgs, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
NIAH_TASKS = [t for t in TASKS if t != "vt"]

# RULER's strings, copied from its constants.py files (not from machinery/ruler.py)
RULER_NIAH = ("Some special magic {type_needle_v} are hidden within the following text. Make sure "
              "to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
              "What are all the special magic {type_needle_v} for {query} mentioned in the "
              "provided text?")
RULER_NIAH_PREFIX = (" The special magic {type_needle_v} for {query} mentioned in the provided "
                     "text are")
RULER_VT = ("Memorize and track the chain(s) of variable assignment hidden in the following text."
            "\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in "
            "the text above.")
RULER_VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, "
                   "{num_v} variables are assigned the value {query}, they are: ")
RULER_NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
               "again.")


def ruler_string_match_all(preds, refs):  # scripts/eval/synthetic/constants.py
    score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref)
                 for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


def ruler_postprocess_pred(predict_str):  # scripts/eval/evaluate.py
    predict_str = predict_str.strip()
    np_pattern = re.compile(r'[\x00-\x1f]')
    return np_pattern.sub('\n', predict_str).strip()


def ruler_niah_input(task, sample, chat="{task_template}"):
    """niah.py's generate_input_output (and prepare.py's template) with the draws it would make
    taken from the sample: its needles, depths or insertion indexes, haystack size, queries."""
    type_haystack, _, type_needle_v, _, num_needle_v, num_needle_q = TASKS[task]
    needles, num_haystack = sample["needles"], sample["haystack"]
    if type_haystack == "essay":
        haystack = " ".join(ruler.essay_sentences()).split(" ")
        repeats = (num_haystack + len(haystack) - 1) // len(haystack)
        text = " ".join((haystack * repeats)[:num_haystack])
        document_sents = ruler.split_sentences(text.strip().split(" "))  # RULER: sent_tokenize
        insertion_positions = [0] + sorted([int(len(document_sents) * (depth / 100))
                                            for depth in sample["depths"]]) + [len(document_sents)]
        document_sents_list = []
        for i in range(1, len(insertion_positions)):
            last_pos, next_pos = insertion_positions[i - 1], insertion_positions[i]
            document_sents_list.append(" ".join(document_sents[last_pos:next_pos]))
            if i - 1 < len(needles):
                document_sents_list.append(needles[i - 1])
        context = " ".join(document_sents_list)
    else:
        if type_haystack == "noise":
            sentences = [RULER_NOISE] * num_haystack
        else:  # the distractors, as the prompt holds them
            lines = sample["prompt"].split("\n")
            sentences = [x for x in lines if x.startswith("One of") and x not in needles]
            assert len(sentences) == num_haystack
        for index, element in zip(sample["positions"], needles):
            sentences.insert(index, element)
        context = "\n".join(sentences)
    queries = sample["queries"]
    query = ', '.join(queries[:-1]) + ', and ' + queries[-1] if len(queries) > 1 else queries[0]
    template = chat.format(task_template=RULER_NIAH) + RULER_NIAH_PREFIX
    if num_needle_q * num_needle_v == 1:
        template = template.replace('Some', 'A')
        template = template.replace('are all', 'is')
        template = template.replace('are', 'is')
        template = template.replace('answers', 'answer')
        type_needle_v = type_needle_v[:-1]
    return template.format(type_needle_v=type_needle_v, context=context, query=query)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(resolve(SMOLLM2))


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    return Prompts(smollm2_tokenizer)


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_a_needle_prompt_is_the_one_rulers_code_writes_from_the_same_draws(task, prompts):
    for length, index in ((4096, 0), (8192, 1), (700, 2)):
        sample = prompts.sample(task, length, index)
        assert sample["prompt"] == ruler_niah_input(task, sample)


def test_the_chat_template_wraps_the_task_and_the_answer_prefix_follows(smollm2_tokenizer):
    chat = Prompts(smollm2_tokenizer, template="meta-chat")
    sample = chat.sample("niah_multivalue", 2048, 0)
    assert sample["prompt"] == ruler_niah_input("niah_multivalue", sample, ruler.CHAT["meta-chat"])
    assert sample["prompt"].startswith("[INST] Some special magic numbers are hidden")
    assert " [/INST] The special magic numbers for " in sample["prompt"]


def test_one_value_asked_reads_in_the_singular_as_rulers_docstring_shows(prompts):
    sample = prompts.sample("niah_single_2", 2048, 0)
    key = sample["queries"][0]
    assert sample["prompt"].startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n")
    assert sample["prompt"].endswith(
        f"\nWhat is the special magic number for {key} mentioned in the provided text? The special "
        f"magic number for {key} mentioned in the provided text is")


def test_variable_tracking_is_rulers_chain_in_noise_after_its_worked_example(prompts):
    example = prompts.example()
    lines = example.split("\n")
    assert sum(x.startswith("VAR ") for x in lines) == 5
    assert "= 12345\n" in example and example.endswith("\n")
    for index in range(3):
        sample = prompts.sample("vt", 4096, index)
        names, value = sample["references"], sample["queries"][0]
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in
                                                 zip(names, names[1:])]
        sentences = [RULER_NOISE] * sample["haystack"]
        for j, position in enumerate(sample["positions"]):
            sentences.insert(position + j, chain[j])
        task = (RULER_VT + RULER_VT_PREFIX).format(context="\n".join(sentences), query=value,
                                                   num_v=5)
        assert sample["prompt"].endswith("\n" + task) and len(set(names)) == 5
        icl = sample["prompt"][:-len(task) - 1]  # the example, its names and value drawn anew
        old = example.strip().split()[-5:]
        new = icl.strip().split()[-5:]
        drawn = re.search(r"= (\d+)\n", icl).group(1)
        assert re.fullmatch(r"\d{5}", drawn) and icl.count(drawn) == 3  # chain, question, answer
        for a, b in zip(old, new):
            icl = icl.replace(b, a)
        assert icl.replace(drawn, "12345") == example


def merging_tokenizer():
    """Bytes and one merge, ".\n", which Llama 3's pre-tokenizer keeps in one piece: a sentence
    and the newline after it are one token fewer together than apart, so counting pieces apart
    overestimates every noise haystack by a token a sentence."""
    ranks = {bytes([i]): i for i in range(256)} | {b".\n": 256}
    return Tokenizer(ranks, {"<s>": 257, "</s>": 258}, LLAMA3_PATTERN, bos_id=257, eos_id=258,
                     add_bos=True)


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("which", ["bytes", "merging", "smollm2"])
def test_the_prompt_is_the_largest_that_fits_the_length_exactly(task, which, smollm2_tokenizer,
                                                                 monkeypatch):
    tokenizer = {"bytes": byte_tokenizer(add_bos=True), "merging": merging_tokenizer(),
                 "smollm2": smollm2_tokenizer}[which]
    fits = []
    fit = Prompts.fit
    monkeypatch.setattr(Prompts, "fit", lambda self, build, *a: fits.append(build)
                        or fit(self, build, *a))
    p = Prompts(tokenizer)
    for length in (1024, 4096, 16384) if which == "smollm2" else (1500, 3000):
        sample = p.sample(task, length, 0)
        build, n = fits[-1], sample["haystack"]
        assert sample["tokens"] == tokenizer.encode(sample["prompt"])
        assert sample["prompt_tokens"] + sample["generate"] <= length
        longer = len(tokenizer.encode("".join(build(n + 1)))) + sample["generate"]
        assert longer > length, (n, longer)  # one more sentence, word or distractor: too long
        assert sample["generate"] == (30 if task == "vt" else 128)


@pytest.mark.parametrize("error", [0.7, 1.3])
def test_the_fit_is_exact_whatever_the_estimate(error, smollm2_tokenizer, monkeypatch):
    """The piece counts only guide the search; the prompts it lands on are encoded: an estimate
    30% off still gives the largest haystack that fits."""
    exact = Prompts(smollm2_tokenizer).sample("niah_single_2", 4096, 0)
    count = Prompts.count
    monkeypatch.setattr(Prompts, "count", lambda self, pieces: int(count(self, pieces) * error))
    assert Prompts(smollm2_tokenizer).sample("niah_single_2", 4096, 0) == exact


def test_largest_from_finds_the_edge_from_any_guess():
    for edge in (0, 1, 5, 37, 1000):
        for guess in (0, 1, edge, edge + 1, 3 * edge + 7):
            assert ruler.largest_from(lambda n: n <= edge, guess) == edge


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_each_key_asked_stands_once_per_needle_and_no_reference_outside_them(task, prompts):
    for index in range(4):
        sample = prompts.sample(task, 4096, index)
        prompt = sample["prompt"]
        for key in sample["queries"]:
            with_key = [n for n in sample["needles"] if f" for {key} is: " in n]
            assert with_key and prompt.count(key) == len(with_key) + 2  # + question, answer prefix
        outside = prompt
        for needle in sample["needles"]:
            assert prompt.count(needle) == 1
            outside = outside.replace(needle, "")
        assert not any(r.lower() in outside.lower() for r in sample["references"])
        kind = TASKS[task][2]
        pattern = {"numbers": r"\d{7}", "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab]"
                   r"[0-9a-f]{3}-[0-9a-f]{12}"}[kind]
        assert all(re.fullmatch(pattern, r) for r in sample["references"])
        n_keys, n_values, n_queries = TASKS[task][3:]
        assert len(sample["needles"]) == max(n_keys, n_queries) * n_values
        assert len(sample["references"]) == n_queries * n_values


def test_variable_tracking_references_appear_only_in_the_chain(prompts):
    for index in range(4):
        sample = prompts.sample("vt", 4096, index)
        outside = sample["prompt"]
        for line in sample["needles"]:
            outside = outside.replace(line, "")
        assert not any(name in outside for name in sample["references"])


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_1", "niah_single_1",
                                  "niah_multikey_2"])
def test_needles_stand_at_their_depths(task, prompts):
    """RULER's depths: in the essay a needle at depth d follows int(len(sentences) · d / 100) of
    its sentences; among noise or distractor sentences it follows as many as its drawn index."""
    for index in range(3):
        sample = prompts.sample(task, 8192, index)
        prompt = sample["prompt"]
        start, end = prompt.index("afterwards.\n") + 12, prompt.rindex("\nWhat ")
        haystack = prompt[start:end]
        for needle in sample["needles"]:
            haystack = haystack.replace(needle, "")
        total = len(ruler.split_sentences(haystack.split()))
        if task.startswith("niah_multikey_2") or task == "niah_single_1":
            for needle, position in zip(sample["needles"], sample["positions"]):
                lines = prompt[start:prompt.index(needle)].split("\n")
                assert sum(x not in sample["needles"] for x in lines[:-1]) == position
            continue
        needles = sorted(sample["needles"], key=prompt.index)
        for needle, depth in zip(needles, sorted(sample["depths"])):
            before = prompt[start:prompt.index(needle)]
            for other in needles:
                before = before.replace(other, "")
            assert len(ruler.split_sentences(before.split())) == int(total * (depth / 100))
        assert all(d in ruler.DEPTHS for d in sample["depths"])


def test_the_40_depths_are_rulers_linspace():
    assert len(ruler.DEPTHS) == 40 and ruler.DEPTHS[:4] == [0, 3, 5, 8] and ruler.DEPTHS[-1] == 100


def test_the_score_is_rulers_string_match_all_on_recorded_answers():
    g = torch.Generator().manual_seed(0)
    refs = [["1234567"], ["abc-def", "7654321"], ["X1", "Y2", "Z3", "W4"]] * 10
    preds = []
    for i, ref in enumerate(refs):
        keep = [r.upper() if i % 2 else r for r in ref if torch.rand(1, generator=g) < 0.6]
        preds.append(f"\x07 The numbers are {' and '.join(keep)}.\n\x1b")
    ours = ruler.string_match_all([ruler.postprocess(p) for p in preds], refs)
    assert ours == ruler_string_match_all([ruler_postprocess_pred(p) for p in preds], refs)
    assert 0 < ours < 100
    assert [ruler.postprocess(p) for p in preds] == [ruler_postprocess_pred(p) for p in preds]


def test_a_128k_prompt_is_built_in_under_two_seconds(smollm2_tokenizer):
    """CPU seconds of this process (the build is single-threaded): on a shared machine the wall
    clock also counts the time other jobs hold the cores."""
    p = Prompts(smollm2_tokenizer)
    p.essay()  # the novel read once, as for every later sample
    for task in ("niah_single_2", "niah_multikey_2", "niah_single_1"):
        start = time.process_time()
        sample = p.sample(task, 131072, 0)
        seconds = time.process_time() - start
        assert 131072 - 200 < sample["prompt_tokens"] + 128 <= 131072 and seconds < 2, seconds


def test_samples_are_reproducible_and_differ_by_index(smollm2_tokenizer):
    a = Prompts(smollm2_tokenizer, seed=3).sample("niah_multikey_3", 2048, 1)
    b = Prompts(smollm2_tokenizer, seed=3).sample("niah_multikey_3", 2048, 1)
    assert a == b
    others = {Prompts(smollm2_tokenizer, seed=3).sample("niah_multikey_3", 2048, i)["references"][0]
              for i in range(5)}
    assert len(others) == 5


def test_unknown_task_and_too_short_length_are_one_sentence(prompts):
    with pytest.raises(ruler.UserError, match="unknown task 'niah_single_9'"):
        prompts.sample("niah_single_9", 4096, 0)
    with pytest.raises(ruler.UserError, match=r"vt \(with its worked example\) needs \d+ tokens "
                                              "with no haystack at all"):
        prompts.sample("vt", 400, 0)


# ---- eval_ruler.py --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer model (window 256) with the byte tokenizer, as a Hugging Face directory."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258,
                                  hidden_dim=128, max_seq_len=256))
    directory = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(directory, tokenizer=byte_tokenizer(add_bos=True))
    return directory


def test_eval_ruler_records_every_sample_and_scores_them_as_ruler(tiny, tmp_path, capsys):
    out = tmp_path / "ruler.json"
    argv = ["--model", str(tiny), "--lengths", "1200,1400", "--samples", "3", "--tasks",
            "niah_single_1,niah_multikey_3,vt", "--out", str(out),
            "--plot", str(tmp_path / "r.png")]
    results = eval_ruler.main(argv)
    printed = capsys.readouterr().out
    assert "warning: length 1200 is past the model's window of 256 tokens" in printed
    assert json.loads(out.read_text()) == results and (tmp_path / "r.png").stat().st_size > 0
    table = (tmp_path / "ruler.md").read_text()
    assert table.startswith("| task | 1200 | 1400 |") and table in printed
    for length in ("1200", "1400"):
        record = results["lengths"][length]
        samples = record["samples"]
        assert [(s["task"], s["index"]) for s in samples] == [
            (t, i) for t in ("niah_single_1", "niah_multikey_3", "vt") for i in range(3)]
        for task, score in record["tasks"].items():
            mine = [s for s in samples if s["task"] == task]
            answers = [ruler_postprocess_pred(s["answer"]) for s in mine]
            assert score == ruler_string_match_all(answers, [s["references"] for s in mine])
        assert all(s["prompt_tokens"] + s["generate"] <= int(length) for s in samples)
        assert all({"references", "answer", "needles", "haystack", "depths"} <= s.keys()
                   for s in samples)
    # a rerun with the same settings skips both lengths
    assert eval_ruler.main(argv)["lengths"] == results["lengths"]


def test_eval_ruler_answers_equal_a_fresh_prefill_per_sample(tiny):
    model = Transformer.from_pretrained(tiny)
    tokenizer = byte_tokenizer(add_bos=True)
    p = Prompts(tokenizer)
    samples = sorted((p.sample("niah_single_1", 1000, i) for i in range(4)),
                     key=lambda s: s["tokens"])
    shared = SharedPrefix(model, "cpu")
    for s in samples:
        ours = eval_ruler.run_sample(model, tokenizer, s, "cpu", shared)
        fresh = model.generate(torch.tensor([s["tokens"]]), s["generate"],
                               eos_id=tokenizer.eos_id)[0]
        assert ours["answer"] == tokenizer.decode(fresh.tolist())


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "niah_single_1,niah_singel_2"], "unknown task 'niah_singel_2' \\(did you mean "
                                                 "'niah_single_2'\\?\\)"),
    (["--lengths", "300"], "niah_single_1 needs \\d+ tokens with no haystack at all \\(128 of "
                           "them to generate\\); length 300 is too short"),
    (["--samples", "0"], "--samples 0: give at least 1"),
])
def test_eval_ruler_bad_input_is_one_sentence_and_a_nonzero_exit(argv, message, tiny, tmp_path):
    base = {"--model": str(tiny), "--lengths": "1200", "--tasks": "niah_single_1",
            "--out": str(tmp_path / "x.json")}
    base.update(dict(zip(argv[::2], argv[1::2])))
    with pytest.raises(SystemExit) as exit_info:
        eval_ruler.main([x for kv in base.items() for x in kv])
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and "\n" not in text and re.search(message, text), text
    assert not (tmp_path / "x.json").exists()
