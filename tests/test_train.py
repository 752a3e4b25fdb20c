"""train.py as a specification: the data of a step do not depend on the world size or on earlier
steps, FSDP2 on two processes trains exactly what one process trains, a resumed run ends where an
uninterrupted one does, the final checkpoint loads as the extended model, and user mistakes end in
one sentence, not a traceback."""

import json
import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from machinery import checkpoint
from machinery import config
import train
from machinery.data import read_documents
from model import ModelArgs, Transformer
from conftest import WORDS, byte_tokenizer, save_tiny_model, write_documents

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny matrices, one thread


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer model with Lo = 32 saved as a Hugging Face directory, and six text documents of
    60-800 bytes."""
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_model(root / "base")
    write_documents(root / "data")
    return root


def argv(tiny, out, *extra):
    return [
        "--model",
        str(tiny / "base"),
        "--data",
        str(tiny / "data"),
        "--target_len",
        "128",
        "--steps",
        "4",
        "--batch_size",
        "4",
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--peak_tflops",
        "1",
        "--save_dtype",
        "float32",
        "--out",
        str(out),
        *extra,
    ]


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(Path(out) / "final" / "model.safetensors")


def run_script(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


# ---- the data of a step --------------------------------------------------------------------------


def cfg_for(**kw):
    return config.Config(**{"train_len": 16, "target_len": 256, "batch_size": 8, **kw})


def test_pose_draws_are_fresh_every_step_and_reproducible():
    docs = [torch.arange(100, dtype=torch.int32)]  # one document: only the PoSE draw can differ
    cfg = cfg_for()
    t1, p1, _ = train.draw_batch(docs, cfg, step=1)
    t2, p2, _ = train.draw_batch(docs, cfg, step=2)
    assert not torch.equal(p1, p2) and not torch.equal(t1, t2)  # nothing cached per document
    assert len({tuple(p.tolist()) for p in p1}) == 8  # nor per example within a step
    again = train.draw_batch(docs, cfg, step=1)
    # a function of (seed, step) alone
    assert torch.equal(again[0], t1) and torch.equal(again[1], p1)
    assert not torch.equal(train.draw_batch(docs, cfg_for(seed=1), step=1)[1], p1)
    assert (p1.diff(dim=1) > 0).all() and p1.max() < cfg.target_len and t1.shape == (8, 16)


def test_any_seed_and_step_draw_their_own_batch_and_recorded_runs_draw_as_before():
    """torch's mt19937 keeps 32 bits of a seed: packing seed << 20 | step beyond 12 + 20 bits
    would give seed 4096 the batches of seed 0; the recorded runs' packing stays as it was."""
    docs = [torch.arange(100, dtype=torch.int32)]
    assert train.step_seed(3, 5) == 3 << 20 | 5  # the draw of every run in docs/RESULTS.md
    pairs = [(seed, step) for seed in (0, 1, 4095, 4096, 2**40) for step in (1, 2**20 - 1, 2**20)]
    assert len({train.step_seed(*pair) for pair in pairs}) == len(pairs)
    positions = [
        train.draw_batch(docs, cfg_for(seed=seed), step)[1]
        for seed, step in ((0, 1), (4096, 1), (0, 2**20 + 1), (2**40, 1))
    ]
    assert all(not torch.equal(positions[0], other) for other in positions[1:])


def test_targets_are_next_tokens_with_chunk_boundaries_masked():
    docs = [torch.arange(1000, dtype=torch.int32)]  # token value = its index in the document
    tokens, _, targets = train.draw_batch(docs, cfg_for(), step=3)
    kept = targets[:, :-1] != train.IGNORE
    # only true next tokens are labels
    assert torch.equal(targets[:, :-1][kept], (tokens[:, :-1] + 1)[kept])
    assert (targets[:, -1] == train.IGNORE).all()
    masked = (~kept).sum(dim=1)
    # N=2: at most one boundary label each
    assert ((masked == 0) | (masked == 1)).all() and masked.sum() > 0


def test_keep_boundary_reaches_the_labels():
    """--keep_boundary: the one label where the text jumps is kept (the authors' choice): every
    label is the next token of the example, none masked but the last."""
    docs = [torch.arange(1000, dtype=torch.int32)]
    tokens, _, targets = train.draw_batch(docs, cfg_for(keep_boundary=True), step=3)
    assert torch.equal(targets[:, :-1], tokens[:, 1:]) and (targets[:, -1] == train.IGNORE).all()
    # there were jumps to mask, so the flag had work to do
    assert (tokens[:, 1:] != tokens[:, :-1] + 1).any()


def test_ranks_train_contiguous_blocks_of_the_same_global_batch_in_order():
    """train.rank_rows: rank r of W trains rows r·B/W..(r+1)·B/W of the one global batch, so the
    data ignore W."""
    for world in (1, 2, 4, 8):
        rows = [list(range(64))[train.rank_rows(64, world, r)] for r in range(world)]
        assert [i for part in rows for i in part] == list(range(64)) and len(
            {len(p) for p in rows}
        ) == 1


def test_the_process_sees_no_gpu():
    """tests/conftest.py hides CUDA for the CPU suite, and subprocesses inherit it (POSE_TEST_CUDA=1
    lifts it)."""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    child = run_script("-c", "import torch; print(torch.cuda.is_available())", check=True)
    assert child.stdout.strip() == "False"


def test_flags_keep_their_types():
    cfg = config.parse_args(
        [
            "--micro_batch_size",
            "2",
            "--save_every",
            "0",
            "--weight_decay",
            "0.1",
            "--train_len",
            "64",
            "--peak_tflops",
            "1.5",
            "--no-lr_decay",
            "--checkpointing",
        ]
    )
    assert (cfg.micro_batch_size, cfg.save_every, cfg.weight_decay, cfg.train_len) == (
        2,
        0,
        0.1,
        64,
    )
    assert (
        cfg.peak_tflops == 1.5
        and cfg.lr_decay is False
        and cfg.checkpointing is True
        and cfg.dtype is None
    )
    # the paper's defaults: 1,000 steps, batch 64, lr 2e-5, warm-up 10
    assert config.parse_args([]) == config.Config()
    assert (
        config.Config.steps,
        config.Config.batch_size,
        config.Config.lr,
        config.Config.warmup,
    ) == (1000, 64, 2e-5, 10)


def test_log_warmup_is_deepspeeds_warmup_lr():
    """DeepSpeed WarmupLR, warmup_type log (their default): gamma = ln(i + 1) / ln(warmup) at
    iteration i = step - 1."""
    cfg = config.Config(steps=20, warmup=10, lr=1.0, warmup_type="log")
    assert [train.lr_at(s, cfg) for s in (1, 10)] == [0.0, 1.0]
    assert train.lr_at(4, cfg) == pytest.approx(math.log(4) / math.log(10))
    assert train.lr_at(11, cfg) == train.lr_at(11, config.Config(steps=20, warmup=10, lr=1.0))


def test_lr_warms_up_linearly_then_decays_to_zero_or_stays():
    cfg = config.Config(steps=20, warmup=10, lr=1.0)
    assert [train.lr_at(s, cfg) for s in (1, 5, 10)] == [0.1, 0.5, 1.0]
    lrs = [train.lr_at(s, cfg) for s in range(11, 21)]
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(1 / 11)
    assert train.lr_at(15, config.Config(steps=20, warmup=10, lr=1.0, lr_decay=False)) == 1.0


# ---- training runs -------------------------------------------------------------------------------


@pytest.mark.slow
def test_fsdp2_on_two_processes_trains_what_one_process_trains(tiny, tmp_path):
    """torchrun, 2 CPU ranks, gloo, FSDP2 with activation checkpointing vs a plain single process:
    same losses, same gradient norms (clip_grad_norm_ over DTensor gradients), same final
    weights."""
    run_script("train.py", *argv(tiny, tmp_path / "one", "--micro_batch_size", "1"), check=True)
    two = run_script(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "train.py",
        *argv(tiny, tmp_path / "two", "--micro_batch_size", "1", "--checkpointing"),
    )
    assert two.returncode == 0, two.stderr
    assert "world 2" in two.stdout
    torch.testing.assert_close(
        losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=0, atol=1e-5
    )
    norms = [
        [
            json.loads(line)["grad_norm"]
            for line in (tmp_path / d / "log.jsonl").read_text().splitlines()
        ]
        for d in ("one", "two")
    ]
    assert norms[0][0] > 1.0  # clipping was active
    torch.testing.assert_close(norms[1], norms[0], rtol=1e-5, atol=0)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)
    # under FSDP each rank wrote its own part of the checkpoint (DCP), published as step-000004;
    # one process loads it
    path = checkpoint.find_checkpoint(tmp_path / "two")
    assert path == tmp_path / "two" / "checkpoints" / "step-000004"
    assert len(list(path.glob("*.distcp"))) == 2
    assert not (tmp_path / "two" / "checkpoint.pt").exists() and not list(path.parent.glob("*.tmp"))
    final = Transformer.from_pretrained(tmp_path / "two" / "final")
    with torch.device("meta"):
        model = Transformer(final.args)
    model.to_empty(device="cpu")
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint.load_checkpoint(path, model, optimizer)
    for name, tensor in final.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert set(optimizer.state_dict()["state"]) == set(range(len(list(model.parameters()))))


def test_timeout_reaches_the_process_group(monkeypatch):
    """--timeout (minutes) is the collective timeout every rank's process group is made with."""
    seen = {}
    monkeypatch.setattr(
        train.dist,
        "init_process_group",
        lambda backend, timeout: seen.update(backend=backend, timeout=timeout),
    )
    for key, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    cfg = config.Config(timeout=90.0, batch_size=2, micro_batch_size=1)
    assert train.set_up_processes(cfg)[:2] == (2, 0)
    assert seen == {"backend": "gloo", "timeout": timedelta(minutes=90)}


def test_micro_batch_size_changes_memory_not_the_result(tiny, tmp_path):
    """The loss is the mean over all target tokens of the global batch, however it is split into
    micro batches."""
    train.main(argv(tiny, tmp_path / "a", "--micro_batch_size", "1"))
    train.main(argv(tiny, tmp_path / "b", "--micro_batch_size", "4"))
    torch.testing.assert_close(losses(tmp_path / "b"), losses(tmp_path / "a"), rtol=0, atol=1e-5)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)


def test_compiled_blocks_train_what_eager_blocks_train(tiny, tmp_path):
    """--compile fuses each block's elementwise work (torch.compile / inductor); the arithmetic is
    the same."""
    torch._dynamo.reset()
    train.main(argv(tiny, tmp_path / "eager"))
    train.main(argv(tiny, tmp_path / "compiled", "--compile"))
    torch.testing.assert_close(
        losses(tmp_path / "compiled"), losses(tmp_path / "eager"), rtol=1e-5, atol=0
    )
    eager, compiled = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    # compiling in place keeps the parameter names of checkpoints
    assert compiled.keys() == eager.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=0, atol=1e-5, msg=name)


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    common = ["--steps", "6", "--save_every", "3", "--micro_batch_size", "2"]
    train.main(argv(tiny, tmp_path / "whole", *common))

    draw = train.draw_batch

    # the job dies mid-run, after the checkpoint of step 3 and one more step
    def killed_in_step_5(docs, cfg, step):
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
    assert (
        e.value.code == 1
        and "add --resume to continue it, or --overwrite" in capsys.readouterr().err
    )
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    train.main(argv(tiny, tmp_path, "--steps", "1", "--seed", "1", "--overwrite"))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]["seed"] == 1


@pytest.mark.parametrize("scaling", ["linear", "ntk"])  # yarn: with a graded ramp, below
def test_final_checkpoint_loads_as_the_extended_model(tiny, tmp_path, scaling):
    """Ours and transformers both read the trained RoPE (factor = Lt/Lo, original = Lo, context =
    Lt) and agree on the logits at positions beyond Lo. transformers has no static NTK: model.py
    exports it as the enlarged base."""
    from transformers import LlamaForCausalLM

    train.main(argv(tiny, tmp_path, "--steps", "2", "--scaling", scaling))
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["max_position_embeddings"] == 128
    ours = Transformer.from_pretrained(tmp_path / "final")
    assert ours.args.max_seq_len == 128
    if scaling == "ntk":
        assert config["rope_scaling"] is None and config["rope_theta"] == pytest.approx(
            10000 * 4 ** (8 / 6)
        )
    else:
        assert (
            config["rope_scaling"]["rope_type"] == scaling
            and config["rope_scaling"]["factor"] == 4.0
        )
        # transformers takes no Lo in a linear rope_scaling: it is kept beside it, as Phi-3 does
        where = config if scaling == "linear" else config["rope_scaling"]
        assert where["original_max_position_embeddings"] == 32
        assert ours.args.original_max_seq_len == 32 and ours.args.rope_scaling["factor"] == 4.0
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert theirs.config.max_position_embeddings == 128
    x = torch.randint(0, 258, (1, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(20), torch.arange(100, 120)])[None]
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, positions), theirs(x, position_ids=positions).logits, rtol=0, atol=1e-4
        )


def test_the_final_model_is_bf16_safetensors_shards_transformers_loads(tiny, tmp_path, monkeypatch):
    """The export by default: bf16 (the fp32 weights rounded once), cut into safetensors files of
    at most checkpoint.SHARD_BYTES (here 30 kB, so several) with model.safetensors.index.json, one
    tensor gathered at a time; ours and transformers read the same weights and agree on the logits
    at positions beyond Lo."""
    from transformers import LlamaForCausalLM

    train.main(argv(tiny, tmp_path / "fp32", "--steps", "2"))
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 30_000)
    train.main(argv(tiny, tmp_path / "bf16", "--steps", "2", "--save_dtype", "bfloat16"))
    final = tmp_path / "bf16" / "final"
    index = json.loads((final / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (final / "model.safetensors").exists()
    assert sorted(p.name for p in final.glob("*.safetensors")) == files
    shards = [load_file(final / f) for f in files]
    assert all(
        sum(t.numel() * 2 for t in shard.values()) <= 30_000 or len(shard) == 1 for shard in shards
    )
    bf16, fp32 = {k: v for shard in shards for k, v in shard.items()}, weights(tmp_path / "fp32")
    assert bf16.keys() == fp32.keys() == index["weight_map"].keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in bf16.values())
    for name in fp32:
        assert bf16[name].dtype == torch.bfloat16, name
        assert torch.equal(bf16[name], fp32[name].to(torch.bfloat16)), name
    assert json.loads((final / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ours = Transformer.from_pretrained(final)
    theirs = LlamaForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    x = torch.randint(0, 258, (1, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(20), torch.arange(100, 120)])[None]
    with torch.no_grad():
        theirs = theirs(x, position_ids=positions).logits
        torch.testing.assert_close(ours(x, positions), theirs, rtol=0, atol=1e-4)


def test_init_pretrains_from_scratch_without_touching_rope(tiny, tmp_path):
    byte_tokenizer().save(tmp_path / "tok")
    init = json.dumps({"dim": 32, "n_layers": 1, "n_heads": 4, "hidden_dim": 64, "max_seq_len": 24})
    train.main(
        [
            "--init",
            init,
            "--tokenizer",
            str(tmp_path / "tok"),
            "--method",
            "noskip",
            "--data",
            str(tiny / "data"),
            "--steps",
            "2",
            "--batch_size",
            "2",
            "--peak_tflops",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert (
        config["rope_scaling"] is None
        and config["max_position_embeddings"] == 24
        and config["vocab_size"] == 258
    )
    assert (tmp_path / "final" / "tokenizer.json").is_file()


def test_the_optimizer_steps_with_the_logged_learning_rate(tiny, tmp_path, monkeypatch):
    used = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(
        torch.optim.AdamW,
        "step",
        lambda self, *a, **k: used.append(self.param_groups[0]["lr"]) or step(self, *a, **k),
    )
    train.main(argv(tiny, tmp_path, "--steps", "4", "--warmup", "2"))
    logged = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert (
        used
        == logged
        == [
            train.lr_at(s, config.parse_args(argv(tiny, tmp_path, "--steps", "4", "--warmup", "2")))
            for s in range(1, 5)
        ]
        and len(set(used)) == 4
    )


def test_bfloat16_autocasts_the_single_process_forward(tiny, tmp_path, monkeypatch):
    seen = []
    forward = Transformer.forward
    monkeypatch.setattr(
        Transformer,
        "forward",
        lambda self, *a, **k: (
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
            or forward(self, *a, **k)
        ),
    )
    train.main(argv(tiny, tmp_path / "bf16", "--steps", "1", "--dtype", "bfloat16"))
    train.main(argv(tiny, tmp_path / "fp32", "--steps", "1", "--dtype", "float32"))
    assert seen == [torch.bfloat16] * 4 + [False] * 4  # 4 micro batches each
    assert losses(tmp_path / "bf16") != losses(tmp_path / "fp32")


def test_the_rope_factor_is_target_over_the_models_context_not_train_len(tiny, tmp_path):
    """s = Lt / Lo (section 3.2), also when Lc < Lo: Lc 16, Lo 32, Lt 128 -> x4, not x8."""
    train.main(argv(tiny, tmp_path, "--steps", "1", "--train_len", "16"))
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert (
        config["rope_scaling"]["factor"] == 4.0 and config["original_max_position_embeddings"] == 32
    )


@pytest.mark.parametrize(
    "flags", [["--method", "randpos"], ["--method", "full"], ["--content", "aligned"]]
)
def test_baselines_and_aligned_content_train(tiny, tmp_path, flags):
    train.main(argv(tiny, tmp_path, "--steps", "2", "--save_every", "0", *flags))
    assert len(losses(tmp_path)) == 2 and all(math.isfinite(x) for x in losses(tmp_path))
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_a_yarn_run_with_a_graded_ramp_loads_as_the_extended_model(tmp_path):
    """Head dim 16, Lo 64: YaRN's ramp has channels strictly between interpolation and extrapolation
    (with head dim 8 and Lo 32 it is a plain step), and transformers agrees with the trained model
    beyond Lo."""
    from transformers import LlamaForCausalLM

    import rope

    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    theta, plain = rope.inv_freq(16, 10000.0, scaling)[0], rope.inv_freq(16, 10000.0)[0]
    between = ((theta < plain * (1 - 1e-9)) & (theta > plain / 4 * (1 + 1e-9))).sum()
    assert between >= 2
    torch.manual_seed(0)
    Transformer(
        ModelArgs(
            dim=64,
            n_layers=1,
            n_heads=4,
            n_kv_heads=2,
            vocab_size=258,
            hidden_dim=64,
            max_seq_len=64,
        )
    ).save_pretrained(tmp_path / "base", tokenizer=byte_tokenizer())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text(" ".join(WORDS * 40))
    train.main(
        [
            "--model",
            str(tmp_path / "base"),
            "--data",
            str(tmp_path / "data"),
            "--target_len",
            "256",
            "--steps",
            "1",
            "--batch_size",
            "2",
            "--peak_tflops",
            "1",
            "--scaling",
            "yarn",
            "--save_dtype",
            "float32",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    config = json.loads((tmp_path / "out" / "final" / "config.json").read_text())
    assert config["rope_scaling"] == {
        "rope_type": "yarn",
        **{k: v for k, v in scaling.items() if k != "rope_type"},
    }
    ours = Transformer.from_pretrained(tmp_path / "out" / "final")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "out" / "final").eval()
    x = torch.randint(0, 258, (1, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(20), torch.arange(220, 240)])[None]
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, positions), theirs(x, position_ids=positions).logits, rtol=0, atol=1e-4
        )


# ---- bad input: one sentence on stderr, exit status 1, no traceback ------------------------------


def bad(tiny, out, case):
    return {
        "target_len <= train_len": argv(tiny, out, "--train_len", "32", "--target_len", "32"),
        "noskip with a target": argv(tiny, out, "--method", "noskip"),
        "no document long enough": argv(
            tiny,
            out,
            "--data",
            str(tiny / "data" / "doc0.txt"),
            "--train_len",
            "30",
            "--method",
            "full",
            "--target_len",
            "512",
        ),
        "batch not divisible": argv(tiny, out, "--batch_size", "6", "--micro_batch_size", "4"),
        "model not loadable": argv(tiny, out, "--model", str(tiny / "data")),
        "nan loss": argv(
            tiny, out, "--lr", "1e30", "--warmup", "0", "--save_every", "1", "--steps", "5"
        ),
        "resume without checkpoint": argv(tiny, out, "--resume"),
        "fsdp without torchrun": argv(tiny, out, "--fsdp"),
    }[case]


EXPECTED = {
    "target_len <= train_len": "must be larger than --train_len",
    "noskip with a target": "leave --target_len out",
    "no document long enough": "the longest has",
    "batch not divisible": "must be divisible by world size",
    "model not loadable": "neither a .gguf file",
    "nan loss": "the last good checkpoint",
    "resume without checkpoint": "holds no checkpoint",
    "fsdp without torchrun": "needs torchrun",
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_input_exits_with_one_sentence(tiny, tmp_path, capsys, monkeypatch, case):
    """In-process (any other exception fails the test); the command line once, below."""
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        train.main(bad(tiny, tmp_path / "out", case))
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert e.value.code == 1 and len(errors) == 1 and EXPECTED[case] in errors[0], stderr
    # stopped before writing the bad state: a checkpoint of an earlier step stays
    if case == "nan loss":
        assert "step 1)" in errors[0] or "step 2)" in errors[0]
        assert not (tmp_path / "out" / "final").exists()


def test_the_command_line_prints_one_sentence_and_no_traceback(tiny, tmp_path):
    result = run_script("train.py", *bad(tiny, tmp_path / "out", "target_len <= train_len"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and EXPECTED["target_len <= train_len"] in errors[0], result.stderr


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


# ---- data ----------------------------------------------------------------------------------------


def test_read_documents_jsonl_txt_and_directories(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jsonl").write_text(
        '{"text": "first"}\n\n{"text": "second\\u2028line", "id": 3}\n'
    )
    (tmp_path / "a.txt").write_text("a whole file\nis one document")
    (tmp_path / "notes.md").write_text("ignored in a directory")
    assert read_documents(tmp_path / "b" / "x.jsonl") == ["first", "second\u2028line"]
    assert read_documents(tmp_path / "a.txt") == ["a whole file\nis one document"]
    # sorted
    assert read_documents(tmp_path) == [
        "a whole file\nis one document",
        "first",
        "second\u2028line",
    ]


def test_read_documents_counts_bytes_that_are_not_utf8(tmp_path):
    # two bad bytes, one genuine U+FFFD
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 \xff ok \xef\xbf\xbd")
    messages = []
    assert read_documents(tmp_path / "bad.txt", log=messages.append) == [
        "caf\ufffd \ufffd ok \ufffd"
    ]
    assert len(messages) == 1 and messages[0].startswith("data: 2 invalid UTF-8")


@pytest.mark.parametrize(
    "content,message",
    [
        (
            '{"text": "ok"}\n{"text": 3}\n',
            'data: 1 line(s) without a string "text" field in 1 file(s) '
            '(first: {}, line 2: expected an object with a string "text" field) were skipped',
        ),
        (
            '{"text": "ok"}\n\n{oops\n',
            "data: 1 line(s) that are not valid JSON in 1 file(s) (first: {}, line 3: not valid "
            "JSON (Expecting property name enclosed in double quotes)) were skipped",
        ),
    ],
)
def test_read_documents_skips_bad_lines_and_names_file_and_line(tmp_path, content, message):
    (tmp_path / "x.jsonl").write_text(content)
    messages = []
    assert read_documents(tmp_path / "x.jsonl", log=messages.append) == ["ok"]
    assert messages == [message.format(tmp_path / "x.jsonl")]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("x.csv", "text\nhello\n", "unsupported file type '.csv'"),
        ("x.txt", "", "holds no text"),
        ("x.jsonl", "{oops\n", "holds no text (1 file(s), 0 empty document(s))"),
    ],
)
def test_read_documents_errors_name_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError) as e:
        read_documents(tmp_path / name)
    assert message in str(e.value)
    with pytest.raises(ValueError, match="does not exist"):
        read_documents(tmp_path / "missing")


def test_a_file_gone_after_listing_is_named_not_a_traceback(tmp_path):
    from machinery.data import read_batches

    with pytest.raises(ValueError, match=f"cannot read {tmp_path / 'gone.jsonl'}: No such file"):
        list(read_batches([tmp_path / "gone.jsonl"]))


def test_documents_shorter_than_an_example_are_skipped_and_counted(tiny, capsys):
    cfg = config.Config(data=str(tiny / "data"), train_len=100, target_len=400)
    docs = train.load_documents(cfg, byte_tokenizer(), rank=0)
    assert all(len(d) >= 100 for d in docs) and 0 < len(docs) < 6
    assert f"{len(docs)} of 6 documents" in capsys.readouterr().out
    aligned = train.load_documents(
        config.Config(data=str(tiny / "data"), train_len=100, target_len=400, content="aligned"),
        byte_tokenizer(),
        rank=0,
    )
    # aligned reads text up to Lt
    assert all(len(d) >= 400 for d in aligned) and len(aligned) < len(docs)


def test_sharded_checkpoints_are_published_whole_and_the_newest_is_found(tmp_path):
    """checkpoints/step-N.tmp (a save killed mid-way) is never resumed and the next save removes
    it; step-N replaces the same step of a run --overwrite started again; the older checkpoints
    of both kinds go once the new one is complete. A 1-rank gloo group exercises the DCP path."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32, hidden_dim=32))
        optimizer = torch.optim.AdamW(model.parameters())
        torch.save({"step": 2, "config": {}}, tmp_path / "checkpoint.pt")
        (tmp_path / "checkpoints" / "step-000009.tmp").mkdir(parents=True)  # killed mid-save
        assert checkpoint.find_checkpoint(tmp_path) == tmp_path / "checkpoint.pt"
        for config in ({"seed": 0}, {"seed": 1}):  # the second: the same step, --overwrite
            path = checkpoint._save_sharded(tmp_path, model, optimizer, 4, config, None)
            assert checkpoint.read_info(path) == (4, config)
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004"]
        assert (
            checkpoint.save_checkpoint(tmp_path, model, optimizer, 6, {})
            == tmp_path / "checkpoint.pt"
        )  # world size 1: a plain file, and the DCP one goes
        assert not list((tmp_path / "checkpoints").iterdir())
        assert checkpoint.find_checkpoint(tmp_path) == tmp_path / "checkpoint.pt"
    finally:
        dist.destroy_process_group()
