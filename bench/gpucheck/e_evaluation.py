"""Section e of bench/gpu_check.py: the evaluation scripts' work at long lengths."""

import math
import time

import torch

import eval_passkey
import eval_ppl
from bench.gpucheck.common import TOKENIZER, eval_dtype, peak_gib, random_model, reset_peak, sync


def section_e(run, record):
    """e. evaluation at length: passkey and perplexity at 32k; passkey memory at 64k and 128k"""
    from machinery.tokenizer import load_tokenizer

    s, device = run.sizes["e"], run.device
    dtype = eval_dtype(device)
    tokenizer = load_tokenizer(TOKENIZER)
    model = random_model(s["model"], device, dtype).eval()
    assert model.theta.dtype == torch.float64  # RoPE angles are never built in bf16
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    record.update(
        dtype=str(dtype)[6:],
        parameters=sum(p.numel() for p in model.parameters()),
        weights_gib=weights / 2**30,
        prefill_chunk=s["prefill_chunk"],
    )

    def passkey(length, chunk):
        trial = eval_passkey.make_trial(tokenizer, length, 0)
        reset_peak(device)
        start = time.perf_counter()
        result = eval_passkey.run_trial(model, tokenizer, trial, device, prefill_chunk=chunk)
        sync(device)
        return {
            "seconds": time.perf_counter() - start,
            "peak_gib": peak_gib(device),
            "prompt_tokens": result["prompt_tokens"],
            "answer": result["answer"],
        }

    def perplexity_window(length):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, tokenizer.n_vocab, (length,), generator=g).to(device)
        reset_peak(device)
        start = time.perf_counter()
        nll, scored, windows = eval_ppl.document_nll(model, ids, length, min(1024, length // 2))
        sync(device)
        return {
            "seconds": time.perf_counter() - start,
            "peak_gib": peak_gib(device),
            "windows": windows,
            "scored_tokens": scored,
            "ppl": math.exp(nll / scored),
        }

    length = s["length"]
    run.attempt(
        record, f"passkey trial {length}", lambda: passkey(length, s["prefill_chunk"]), need=5
    )
    run.attempt(record, f"perplexity window {length}", lambda: perplexity_window(length), need=5)
    first = record.get(f"passkey trial {length}", {}).get("seconds", 1)
    last = {"in pieces": first, "at once": first}
    for length in s["memory_lengths"]:  # a doubled length costs up to 4x (attention is quadratic)
        for label, chunk in (("in pieces", s["prefill_chunk"]), ("at once", None)):
            result = run.attempt(
                record,
                f"passkey {length} prefill {label}",
                lambda: passkey(length, chunk),
                need=2 * last[label],
            )
            ran = result is not None and "seconds" in result
            last[label] = result["seconds"] if ran else 4 * last[label]
