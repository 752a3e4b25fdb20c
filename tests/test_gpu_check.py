"""bench/gpu_check.py tells the truth: a size the card cannot hold is a limit, not a failure; each
section and slot keeps its time; every attention kernel it records is asserted against the one
model.attend() should run (the CUDA device mocked). And its dry mode: every step of the one-GPU
check runs on the CPU at tiny sizes and passes, so the script does not rot between GPU runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model as model_py
from bench.gpucheck import fit, kernels
from bench.gpucheck.common import (
    LLAMA3_8B,
    LLAMA_7B,
    SIZES,
    OutOfTime,
    Run,
    dtype_keyword,
    failures,
    summary,
)
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
CUDA, BF16 = torch.device("cuda"), torch.bfloat16


def bf16_weights(shape):
    """The bytes of a model's bf16 weights, counted on the meta device."""
    with torch.device("meta"):
        model = Transformer(ModelArgs(**shape))
    return 2 * sum(p.numel() for p in model.parameters())


def prefill_at(shape, tokens, chunk):
    args = ModelArgs(**shape)
    return fit.prefill(args, bf16_weights(shape), tokens, chunk, "cuda", BF16)


def test_a_7b_prefill_at_128k_needs_a_64_gib_kv_cache_beyond_an_80_gb_card():
    mha, gqa = prefill_at(LLAMA_7B, 131072, 4096), prefill_at(LLAMA3_8B, 131072, 4096)
    assert mha["kv_cache_gib"] == 64 and gqa["kv_cache_gib"] == 16  # 2 × 32 × 128k × heads × 256 B
    assert 12.5 < mha["weights_gib"] < 12.6 and 14.9 < gqa["weights_gib"] < 15.0
    assert fit.verdict(mha, usable=79.0) and fit.verdict(mha, usable=139.0) is None  # H100, H200
    assert fit.verdict(gqa, usable=79.0) is None
    at_once = prefill_at(LLAMA_7B, 131072, None)  # the whole prompt's FFN states in one layer
    assert at_once["activations_gib"] > 10 * mha["activations_gib"]
    # GQA's pieces after a cache copy the key/value heads (sdpa_plan): 2 GiB for the last one
    heads_of_their_own = prefill_at(dict(LLAMA3_8B, n_kv_heads=32), 131072, 4096)
    assert gqa["activations_gib"] - heads_of_their_own["activations_gib"] == pytest.approx(2.0)


@pytest.fixture
def clock(monkeypatch):
    """Run's clock, moved by hand: clock.now = seconds."""

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    fake = Clock()
    monkeypatch.setattr(Run, "clock", staticmethod(fake))
    return fake


@pytest.fixture
def run(tmp_path, clock):
    run = Run(tmp_path, dry=True, budget=450)
    run.current, run.section_deadline = "e", run.sizes["budgets"]["e"]
    yield run
    run.tmp.rmdir()


def test_a_size_beyond_the_card_is_a_limit_with_its_estimate_not_a_failure(run, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (79 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 0)
    run.dry = False  # the card's memory, not the dry mode's pretended one
    record = run.results["sections"]["e"] = {}
    ran = []
    estimate = prefill_at(LLAMA_7B, 131072, None)
    run.attempt(record, "7B at 128k at once", lambda: ran.append(1), estimate=estimate)
    assert not ran and "does not fit" in record["7B at 128k at once"]["limit"]
    assert record["7B at 128k at once"]["kv_cache_gib"] == 64
    assert record["7B at 128k at once"]["usable_gib"] == 79
    run.attempt(
        record, "7B at 32k", lambda: {"peak_gib": 29.0}, estimate=prefill_at(LLAMA_7B, 32768, 4096)
    )
    assert record["7B at 32k"]["peak_over_estimate"] == pytest.approx(29.0 / 29.12, abs=1e-3)
    assert failures(run.results) == [] and "1 sizes beyond the card" in summary(run.results)


def test_out_of_memory_within_the_estimate_is_a_failure_unless_it_is_what_is_measured(run):
    record = run.results["sections"]["d"] = {}

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    estimate = {"total_gib": 1e-6}
    run.current = "d"
    run.attempt(record, "pose", out_of_memory, estimate=estimate)
    run.attempt(record, "full", out_of_memory, estimate=estimate, oom_is_limit=True)
    assert record["pose"]["error"]["type"] == "OutOfMemoryError" and "limit" in record["full"]
    assert failures(run.results) == ["d: pose"]


def test_a_step_is_skipped_when_its_slot_cannot_hold_it_and_a_later_slot_keeps_its_time(run, clock):
    gpu = SIZES["gpu"]  # section b's budget and slots on a GPU
    train, fsdp = gpu["b"]["slots"]["train"], gpu["b"]["slots"]["fsdp"]
    assert sum(gpu["budgets"].values()) <= 450 and train + fsdp <= gpu["budgets"]["b"]
    record, run.section_deadline = {}, gpu["budgets"]["b"]
    with run.slot(train):  # the kill-and-resume runs take all of their slot
        clock.now = train - 1.0
        run.attempt(record, "--resume", lambda: {"ok": True}, need=20)
    with run.slot(fsdp):  # the FSDP2 slot still has its own time
        assert run.left() == fsdp
        run.attempt(record, "torchrun --fsdp", lambda: {"ok": True}, need=45)
    assert "skipped" in record["--resume"] and record["torchrun --fsdp"] == {"ok": True}

    def killed_at_the_slots_end():
        raise OutOfTime("killed at its slot's end, after 35 s")

    run.attempt(record, "FSDP2 fp32", killed_at_the_slots_end)
    assert "slot's end" in record["FSDP2 fp32"]["skipped"] and not failures(run.results)
    clock.now = gpu["budgets"]["b"] - 30
    with run.slot(fsdp):  # never past the section's end
        assert run.left() == 30
    run.section_deadline = 1e9
    clock.now = 440
    with run.slot(fsdp):  # nor the run's 450 s
        assert run.left() == 10


def test_the_kernel_expected_follows_use_flash_attn_and_sdpa_plan(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(model_py, "flash_attn_func", None)
    gqa = (32, 8, 128)  # Llama-3-8B's heads
    assert kernels.expected(CUDA, BF16, 4096, 4096, *gqa) == {"sdpa-flash", "sdpa-cudnn"}
    assert kernels.expected(CUDA, BF16, 1, 8193, *gqa) == {"sdpa-flash", "sdpa-cudnn"}  # decode
    assert kernels.expected(CUDA, BF16, 4096, 8192, *gqa) == {"sdpa-flash"}  # lower-right bias
    assert kernels.expected(CUDA, torch.float32, 4096, 8192, *gqa) == {"sdpa-efficient"}
    assert kernels.expected(CUDA, BF16, 64, 64, 4, 4, 320) == {"sdpa-efficient"}  # head > 256
    cpu = torch.device("cpu")
    assert kernels.expected(cpu, torch.float32, 64, 128, *gqa) == {"sdpa-flash-cpu"}
    monkeypatch.setattr(model_py, "flash_attn_func", object())  # flash-attn installed
    assert kernels.expected(CUDA, BF16, 4096, 8192, *gqa) == {"flash_attn"}
    assert kernels.expected(CUDA, torch.float32, 4096, 8192, *gqa) == {"sdpa-efficient"}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert kernels.expected(CUDA, BF16, 4096, 8192, *gqa) == {"sdpa-efficient"}  # before sm80


def test_a_recorded_kernel_other_than_the_expected_one_fails_the_check(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(model_py, "flash_attn_func", None)
    piece = [(CUDA, BF16, 4096, 8192, 32, 8, 128)]
    assert kernels.verdict(["sdpa-flash"], piece)["as_expected"]
    assert not kernels.verdict(["sdpa-math"], piece)["as_expected"]
    assert not kernels.verdict(["sdpa-efficient"], piece)["as_expected"]  # linear, not planned
    assert not kernels.verdict([], piece)["as_expected"]  # nothing recorded: nothing vouched for
    step = [(CUDA, BF16, 256, 256, 4, 2, 64)]
    assert not kernels.verdict(["sdpa-flash"], step, backward=True)["as_expected"]
    assert kernels.verdict(["backward: sdpa-flash", "sdpa-flash"], step, backward=True)[
        "as_expected"
    ]


def test_profiler_event_names_map_to_the_kernels():
    assert kernels.label("aten::_scaled_dot_product_flash_attention") == "sdpa-flash"
    assert kernels.label("aten::_efficient_attention_forward") == "sdpa-efficient"
    assert kernels.label("aten::_efficient_attention_backward") == "backward: sdpa-efficient"
    assert kernels.label("aten::_scaled_dot_product_attention_math") == "sdpa-math"
    assert kernels.label("void pytorch_flash::flash_fwd_kernel<Flash_fwd_traits>(Params)") is None
    assert kernels.label("void flash::flash_fwd_kernel<Flash_fwd_traits>(Params)") == "flash_attn"
    assert kernels.label("flash_attn::_flash_attn_backward") == "backward: flash_attn"
    assert kernels.label("aten::mm") is None


def test_transformers_dtype_keyword_by_release():
    assert dtype_keyword("4.55.4") == "torch_dtype" and dtype_keyword("4.45.0") == "torch_dtype"
    assert dtype_keyword("4.56.0") == "dtype" and dtype_keyword("4.56.0.dev0") == "dtype"
    assert dtype_keyword("5.17.0") == "dtype"


def test_the_summary_names_the_card_and_gives_no_mfu_for_a_card_not_in_the_table(run):
    env = run.results["environment"]
    assert env["device_name"].startswith("CPU") and env["peak_bf16_tflops"] is None
    env.update(device_name="NVIDIA H100 PCIe", peak_bf16_tflops=756)
    assert f"on NVIDIA H100 PCIe, torch {torch.__version__}," in summary(run.results)
    assert "MFU against 756 TFLOP/s" in summary(run.results)
    env.update(device_name="NVIDIA Some Future GPU", peak_bf16_tflops=None)
    assert "no MFU" in summary(run.results)


@pytest.mark.slow  # left out by pytest -m "not slow"; make test runs it
def test_dry_run_runs_every_section_and_passes_every_check(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    summary = (tmp_path / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stderr
    assert "all passed, no errors" in summary and summary.startswith("gpu_check (dry")
    sections = results["sections"]
    assert list(sections) == list("abcde")
    for name, section in sections.items():  # nothing errored or was skipped, at any level
        assert "error" not in section and "skipped" not in section, (name, section)
        for key, value in section.items():
            bad = isinstance(value, dict) and ("error" in value or "skipped" in value)
            assert not bad, (name, key, value)
    a, b, c, d, e = (sections[k] for k in "abcde")
    logits = [k for k in a if k.startswith("logits ")]
    assert len(logits) == 7 and all(a[k]["ok"] for k in logits)
    cache = a["kv cache at PoSE positions float32"]["kernels"]["piece after a cache (T < S)"]
    assert cache == {
        "seen": ["sdpa-flash-cpu"],
        "expected": ["sdpa-flash-cpu"],
        "as_expected": True,
    }
    assert a["training step kernels"]["kernels"]["seen"] == [
        "backward: sdpa-flash-cpu",
        "sdpa-flash-cpu",
    ]
    assert b["SIGKILL in step 5"]["killed"] and b["SIGKILL in step 5"]["checkpoint_step"] == 4
    assert b["resumed equals uninterrupted"]["bitwise"] and b["FSDP2 equals plain"]["fsdp_in_log"]
    assert b["torchrun --fsdp (bf16, --checkpointing)"]["returncode"] == 0
    assert b["FSDP2 equals plain (bf16)"]["ok"] and b["FSDP2 equals plain (bf16)"]["fsdp_in_log"]
    for impl in ("ours", "ours+compile", "transformers"):
        assert c[impl]["tokens_per_s"] > 0 and c[impl]["peak_gib"] > 0
    # the same weights and batch: the same loss
    assert abs(c["ours"]["loss_after_warm_up"] - c["transformers"]["loss_after_warm_up"]) < 1e-4
    assert {f"{m} Lt={n}" for m in ("pose", "full") for n in (64, 128, 256)} <= set(d)
    for model in ("tiny MHA", "tiny GQA"):  # section e's pretended 24 MiB card
        assert e[f"{model}: attention kernels (two prefill pieces, a decoded token)"]["ok"]
        pieces, at_once = (
            e[f"{model}: passkey 1024 prefill {how}"] for how in ("in pieces", "at once")
        )
        assert pieces["answer"] == at_once["answer"] and pieces["prompt_tokens"] == 1023
        assert e[f"{model}: passkey 8192 prefill in pieces"]["prompt_tokens"] == 8192
        assert "does not fit" in e[f"{model}: passkey 8192 prefill at once"]["limit"]
    assert "2 sizes beyond the card" in summary  # 8192 tokens at once, for each model
