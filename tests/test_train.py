"""train.py as a specification: the data of a step do not depend on the world size or on earlier steps, FSDP2 on
two processes trains exactly what one process trains, a resumed run ends where an uninterrupted one does, the final
checkpoint loads as the extended model, and user mistakes end in one sentence, not a traceback."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from data import read_documents
from model import ModelArgs, Transformer
from tokenizer import GPT2_PATTERN, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the grass is green the sky is blue the sun is yellow here we go there and back again".split()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: a second thread only waits (and on a busy 2-core machine, spins)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def byte_tokenizer():
    """256 byte tokens and two specials: a real byte-level BPE with no merges, small enough for tiny models."""
    return Tokenizer({bytes([i]): i for i in range(256)}, {"<s>": 256, "</s>": 257}, GPT2_PATTERN,
                     bos_id=256, eos_id=257, add_bos=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer model with Lo = 32 saved as a Hugging Face directory, and six text documents of 60-800 bytes."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, hidden_dim=64, max_seq_len=32)
    Transformer(args).save_pretrained(root / "base", tokenizer=byte_tokenizer())
    rng = random.Random(0)
    (root / "data").mkdir()
    for i in range(6):
        (root / "data" / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(12 + 30 * i)))
    return root


def argv(tiny, out, *extra):
    return ["--model", str(tiny / "base"), "--data", str(tiny / "data"), "--target_len", "128", "--steps", "4",
            "--batch_size", "4", "--lr", "1e-3", "--warmup", "2", "--peak_tflops", "1", "--out", str(out), *extra]


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(Path(out) / "final" / "model.safetensors")


def run_script(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          **kwargs)


# ---- the data of a step ------------------------------------------------------------------------------------------

def cfg_for(**kw):
    return train.Config(**{"train_len": 16, "target_len": 256, "batch_size": 8, **kw})


def test_pose_draws_are_fresh_every_step_and_reproducible():
    docs = [torch.arange(100, dtype=torch.int32)]  # one document: only the PoSE draw can differ
    cfg = cfg_for()
    t1, p1, _ = train.draw_batch(docs, cfg, step=1)
    t2, p2, _ = train.draw_batch(docs, cfg, step=2)
    assert not torch.equal(p1, p2) and not torch.equal(t1, t2)  # nothing cached per document
    assert len({tuple(p.tolist()) for p in p1}) == 8  # nor per example within a step
    again = train.draw_batch(docs, cfg, step=1)
    assert torch.equal(again[0], t1) and torch.equal(again[1], p1)  # a function of (seed, step) alone
    assert not torch.equal(train.draw_batch(docs, cfg_for(seed=1), step=1)[1], p1)
    assert (p1.diff(dim=1) > 0).all() and p1.max() < cfg.target_len and t1.shape == (8, 16)


def test_targets_are_next_tokens_with_chunk_boundaries_masked():
    docs = [torch.arange(1000, dtype=torch.int32)]  # token value = its index in the document
    tokens, _, targets = train.draw_batch(docs, cfg_for(), step=3)
    kept = targets[:, :-1] != train.IGNORE
    assert torch.equal(targets[:, :-1][kept], (tokens[:, :-1] + 1)[kept])  # only true next tokens are labels
    assert (targets[:, -1] == train.IGNORE).all()
    masked = (~kept).sum(dim=1)
    assert ((masked == 0) | (masked == 1)).all() and masked.sum() > 0  # N=2: at most one boundary label each


def test_batch_slices_of_ranks_cover_the_global_batch_in_order():
    """Rank r of W trains on rows r·B/W..(r+1)·B/W of the same global batch: the data ignore the world size."""
    docs = [torch.arange(300, dtype=torch.int32), torch.arange(500, 900, dtype=torch.int32)]
    tokens, positions, _ = train.draw_batch(docs, cfg_for(), step=5)
    for world in (1, 2, 4):
        per_rank = 8 // world
        parts = [tokens[r * per_rank:(r + 1) * per_rank] for r in range(world)]
        assert torch.equal(torch.cat(parts), tokens)


def test_flags_keep_their_types():
    cfg = train.parse_args(["--micro_batch_size", "2", "--save_every", "0", "--weight_decay", "0.1", "--train_len",
                            "64", "--peak_tflops", "1.5", "--no-lr_decay", "--checkpointing"])
    assert (cfg.micro_batch_size, cfg.save_every, cfg.weight_decay, cfg.train_len) == (2, 0, 0.1, 64)
    assert cfg.peak_tflops == 1.5 and cfg.lr_decay is False and cfg.checkpointing is True and cfg.dtype is None
    assert train.parse_args([]) == train.Config()  # the paper's defaults: 1,000 steps, batch 64, lr 2e-5, warm-up 10
    assert (train.Config.steps, train.Config.batch_size, train.Config.lr, train.Config.warmup) == (1000, 64, 2e-5, 10)


def test_lr_warms_up_linearly_then_decays_to_zero_or_stays():
    cfg = train.Config(steps=20, warmup=10, lr=1.0)
    assert [train.lr_at(s, cfg) for s in (1, 5, 10)] == [0.1, 0.5, 1.0]
    lrs = [train.lr_at(s, cfg) for s in range(11, 21)]
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(1 / 11)
    assert train.lr_at(15, train.Config(steps=20, warmup=10, lr=1.0, lr_decay=False)) == 1.0


# ---- training runs -----------------------------------------------------------------------------------------------

def test_fsdp2_on_two_processes_trains_what_one_process_trains(tiny, tmp_path):
    """torchrun, 2 CPU ranks, gloo, FSDP2 with activation checkpointing vs a plain single process: same losses,
    same gradient norms (clip_grad_norm_ over DTensor gradients), same final weights."""
    run_script("train.py", *argv(tiny, tmp_path / "one", "--micro_batch_size", "1"), check=True)
    two = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "train.py", *argv(tiny, tmp_path / "two", "--micro_batch_size", "1", "--checkpointing"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world 2" in two.stdout
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=0, atol=1e-5)
    norms = [[json.loads(line)["grad_norm"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
             for d in ("one", "two")]
    assert norms[0][0] > 1.0  # clipping was active
    torch.testing.assert_close(norms[1], norms[0], rtol=1e-5, atol=0)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)
    # the checkpoint written under FSDP is a plain full state dict that one process loads
    state = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and set(state["optimizer"]["state"]) == set(state["model"])
    final = Transformer.from_pretrained(tmp_path / "two" / "final")
    for name, tensor in final.state_dict().items():
        assert torch.equal(state["model"][name], tensor), name


def test_micro_batch_size_changes_memory_not_the_result(tiny, tmp_path):
    """The loss is the mean over all target tokens of the global batch, however it is split into micro batches."""
    train.main(argv(tiny, tmp_path / "a", "--micro_batch_size", "1"))
    train.main(argv(tiny, tmp_path / "b", "--micro_batch_size", "4"))
    torch.testing.assert_close(losses(tmp_path / "b"), losses(tmp_path / "a"), rtol=0, atol=1e-5)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)


def test_compiled_blocks_train_what_eager_blocks_train(tiny, tmp_path):
    """--compile fuses each block's elementwise work (torch.compile / inductor); the arithmetic is the same."""
    torch._dynamo.reset()
    train.main(argv(tiny, tmp_path / "eager"))
    train.main(argv(tiny, tmp_path / "compiled", "--compile"))
    torch.testing.assert_close(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), rtol=1e-5, atol=0)
    eager, compiled = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert compiled.keys() == eager.keys()  # compiling in place keeps the parameter names of checkpoints
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=0, atol=1e-5, msg=name)


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    common = ["--steps", "6", "--save_every", "3", "--micro_batch_size", "2"]
    train.main(argv(tiny, tmp_path / "whole", *common))

    draw = train.draw_batch

    def killed_in_step_5(docs, cfg, step):  # the job dies mid-run, after the checkpoint of step 3 and one more step
        if step == 5:
            raise KeyboardInterrupt
        return draw(docs, cfg, step)

    monkeypatch.setattr(train, "draw_batch", killed_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv(tiny, tmp_path / "cut", *common))
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(train, "draw_batch", draw)
    train.main(argv(tiny, tmp_path / "cut", *common, "--resume"))
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")  # the log holds each step once
    whole, cut = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    for name in whole:
        assert torch.equal(cut[name], whole[name]), name  # bitwise


def test_resume_refuses_changed_settings(tiny, tmp_path, capsys):
    train.main(argv(tiny, tmp_path, "--steps", "1"))
    with pytest.raises(SystemExit) as e:
        train.main(argv(tiny, tmp_path, "--steps", "1", "--chunks", "3", "--resume"))
    assert e.value.code == 1 and "--chunks 2 (now 3)" in capsys.readouterr().err


def test_a_new_run_refuses_to_replace_an_existing_checkpoint(tiny, tmp_path, capsys):
    train.main(argv(tiny, tmp_path, "--steps", "1"))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        train.main(argv(tiny, tmp_path, "--steps", "1", "--seed", "1"))
    assert e.value.code == 1 and "add --resume to continue it, or --overwrite" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    train.main(argv(tiny, tmp_path, "--steps", "1", "--seed", "1", "--overwrite"))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]["seed"] == 1


@pytest.mark.parametrize("scaling", ["linear", "yarn", "ntk"])
def test_final_checkpoint_loads_as_the_extended_model(tiny, tmp_path, scaling):
    """Ours and transformers both read the trained RoPE (factor = Lt/Lo, original = Lo, context = Lt) and agree on
    the logits at positions beyond Lo. transformers has no static NTK: model.py exports it as the enlarged base."""
    from transformers import LlamaForCausalLM

    train.main(argv(tiny, tmp_path, "--steps", "2", "--scaling", scaling))
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["max_position_embeddings"] == 128
    ours = Transformer.from_pretrained(tmp_path / "final")
    assert ours.args.max_seq_len == 128
    if scaling == "ntk":
        assert config["rope_scaling"] is None and config["rope_theta"] == pytest.approx(10000 * 4 ** (8 / 6))
    else:
        assert config["rope_scaling"]["rope_type"] == scaling
        assert config["rope_scaling"]["factor"] == 4.0 and config["rope_scaling"]["original_max_position_embeddings"] == 32
        assert ours.args.original_max_seq_len == 32 and ours.args.rope_scaling["factor"] == 4.0
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert theirs.config.max_position_embeddings == 128
    x = torch.randint(0, 258, (1, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(20), torch.arange(100, 120)])[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(x, positions), theirs(x, position_ids=positions).logits, rtol=0, atol=1e-4)


def test_init_pretrains_from_scratch_without_touching_rope(tiny, tmp_path):
    byte_tokenizer().save(tmp_path / "tok")
    init = json.dumps({"dim": 32, "n_layers": 1, "n_heads": 4, "hidden_dim": 64, "max_seq_len": 24})
    train.main(["--init", init, "--tokenizer", str(tmp_path / "tok"), "--method", "noskip", "--data",
                str(tiny / "data"), "--steps", "2", "--batch_size", "2", "--peak_tflops", "1", "--out", str(tmp_path)])
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["rope_scaling"] is None and config["max_position_embeddings"] == 24 and config["vocab_size"] == 258
    assert (tmp_path / "final" / "tokenizer.json").is_file()


# ---- bad input: one sentence on stderr, exit status 1, no traceback ------------------------------------------------

def bad(tiny, out, case):
    return {
        "target_len <= train_len": argv(tiny, out, "--train_len", "32", "--target_len", "32"),
        "noskip with a target": argv(tiny, out, "--method", "noskip"),
        "no document long enough": argv(tiny, out, "--data", str(tiny / "data" / "doc0.txt"), "--train_len", "30",
                                        "--method", "full", "--target_len", "512"),
        "batch not divisible": argv(tiny, out, "--batch_size", "6", "--micro_batch_size", "4"),
        "model not loadable": argv(tiny, out, "--model", str(tiny / "data")),
        "nan loss": argv(tiny, out, "--lr", "1e30", "--warmup", "0", "--save_every", "1", "--steps", "5"),
        "resume without checkpoint": argv(tiny, out, "--resume"),
    }[case]


EXPECTED = {"target_len <= train_len": "must be larger than --train_len", "noskip with a target": "leave --target_len out",
            "no document long enough": "the longest has", "batch not divisible": "must be divisible by world size",
            "model not loadable": "neither a .gguf file", "nan loss": "the last good checkpoint",
            "resume without checkpoint": "does not exist"}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_input_exits_with_one_sentence(tiny, tmp_path, case):
    result = run_script("train.py", *bad(tiny, tmp_path / "out", case))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and EXPECTED[case] in errors[0], result.stderr[-2000:]
    if case == "nan loss":  # stopped before writing the bad state: a checkpoint of an earlier step stays
        assert "step 1)" in errors[0] or "step 2)" in errors[0]
        assert not (tmp_path / "out" / "final").exists()


def test_out_of_memory_names_the_flags_to_lower(tiny, tmp_path, monkeypatch, capsys):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Transformer, "forward", oom)
    with pytest.raises(SystemExit) as e:
        train.main(argv(tiny, tmp_path))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "--micro_batch_size" in err and "--checkpointing" in err


def test_train_len_above_the_context_warns(tiny, tmp_path, capsys):
    train.main(argv(tiny, tmp_path, "--train_len", "48", "--steps", "1"))
    assert "PoSE assumes Lc <= Lo" in capsys.readouterr().out


# ---- data ---------------------------------------------------------------------------------------------------------

def test_read_documents_jsonl_txt_and_directories(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jsonl").write_text('{"text": "first"}\n\n{"text": "second\\u2028line", "id": 3}\n')
    (tmp_path / "a.txt").write_text("a whole file\nis one document")
    (tmp_path / "notes.md").write_text("ignored in a directory")
    assert read_documents(tmp_path / "b" / "x.jsonl") == ["first", "second\u2028line"]
    assert read_documents(tmp_path / "a.txt") == ["a whole file\nis one document"]
    assert read_documents(tmp_path) == ["a whole file\nis one document", "first", "second\u2028line"]  # sorted


def test_read_documents_counts_bytes_that_are_not_utf8(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 \xff ok \xef\xbf\xbd")  # two bad bytes, one genuine U+FFFD
    messages = []
    assert read_documents(tmp_path / "bad.txt", log=messages.append) == ["caf\ufffd \ufffd ok \ufffd"]
    assert len(messages) == 1 and messages[0].startswith("data: 2 invalid UTF-8")


@pytest.mark.parametrize("content,message", [
    ('{"text": "ok"}\n{"text": 3}\n', 'data: 1 line(s) without a string "text" field in 1 file(s) '
     '(first: {}, line 2: expected an object with a string "text" field) were skipped'),
    ('{"text": "ok"}\n\n{oops\n', "data: 1 line(s) that are not valid JSON in 1 file(s) (first: "
     "{}, line 3: not valid JSON (Expecting property name enclosed in double quotes)) were skipped"),
])
def test_read_documents_skips_bad_lines_and_names_file_and_line(tmp_path, content, message):
    (tmp_path / "x.jsonl").write_text(content)
    messages = []
    assert read_documents(tmp_path / "x.jsonl", log=messages.append) == ["ok"]
    assert messages == [message.format(tmp_path / "x.jsonl")]


@pytest.mark.parametrize("name,content,message", [
    ("x.csv", "text\nhello\n", "unsupported file type '.csv'"),
    ("x.txt", "", "holds no text"),
    ("x.jsonl", "{oops\n", "holds no text (1 file(s), 0 empty document(s))"),
])
def test_read_documents_errors_name_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError) as e:
        read_documents(tmp_path / name)
    assert message in str(e.value)
    with pytest.raises(ValueError, match="does not exist"):
        read_documents(tmp_path / "missing")


def test_documents_shorter_than_an_example_are_skipped_and_counted(tiny, capsys):
    cfg = train.Config(data=str(tiny / "data"), train_len=100, target_len=400)
    docs = train.load_documents(cfg, byte_tokenizer(), rank=0)
    assert all(len(d) >= 100 for d in docs) and 0 < len(docs) < 6
    assert f"{len(docs)} of 6 documents" in capsys.readouterr().out
    aligned = train.load_documents(train.Config(data=str(tiny / "data"), train_len=100, target_len=400,
                                                content="aligned"), byte_tokenizer(), rank=0)
    assert all(len(d) >= 400 for d in aligned) and len(aligned) < len(docs)  # aligned reads text up to Lt
