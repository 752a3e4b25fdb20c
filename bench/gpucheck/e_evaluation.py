"""Section e of bench/gpu_check.py: the evaluation scripts' work at long lengths, for a 7B shape
with multi-head attention (LLaMA-7B) and one with grouped-query attention (Llama-3-8B)."""

import math
import time

import torch

import eval_passkey
import eval_ppl
from bench.gpucheck import fit
from bench.gpucheck.common import (
    TOKENIZER,
    describe,
    eval_dtype,
    free,
    peak_gib,
    random_model,
    reset_peak,
    sync,
)
from bench.gpucheck.kernels import kernels_used, verdict


def section_e(run, record):
    """e. evaluation at length, 7B MHA and GQA: passkey, perplexity, prefill memory, kernels"""
    from machinery.tokenizer import load_tokenizer

    s = run.sizes["e"]
    tokenizer = load_tokenizer(TOKENIZER)
    trials = {}  # one passkey prompt per length, shared by the models
    for name, shape in s["models"].items():
        with run.slot(s["slot"]):  # each model its share of the section
            try:
                evaluate(run, record, name, shape, tokenizer, trials)
            except Exception as e:  # noqa: BLE001 — recorded, and the next model runs
                record[name] = {"error": describe(e)}
            free()


def evaluate(run, record, name, shape, tokenizer, trials):
    """One model shape, random-init in the eval scripts' dtype: its attention kernels on a prompt
    of two prefill pieces and a decoded token; a passkey trial and a perplexity window at
    `length`; a passkey trial's peak memory at each of `memory_lengths`, the prompt prefilled in
    pieces and at once. Each step's memory is estimated first (bench/gpucheck/fit.py): a size
    beyond the card is recorded as that limit."""
    s, device = run.sizes["e"], run.device
    dtype, chunk = eval_dtype(device), s["prefill_chunk"]
    model = random_model(shape, device, dtype).eval()
    assert model.theta.dtype == torch.float64  # RoPE angles are never built in bf16
    args = model.args
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    record[name] = {
        "dtype": str(dtype)[6:],
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_gib": weights / 2**30,
        "heads": f"{args.n_heads} query, {args.n_kv_heads} key/value, head_dim {args.head_dim}",
        "prefill_chunk": chunk,
    }

    def estimate(tokens, piece, **kw):
        return fit.prefill(args, weights, tokens, piece, device.type, dtype, **kw)

    @torch.inference_mode()
    def kernels():
        x = torch.randint(0, tokenizer.n_vocab, (1, 2 * chunk), device=device)
        cache = model.make_cache(1, 2 * chunk + 1)

        def prompt_and_a_token():
            h = model.prefill(x, cache, chunk)
            model(model.logits(h).argmax(-1, keepdim=True), cache=cache, hidden_only=True)

        heads = (args.n_heads, args.n_kv_heads, args.head_dim)
        calls = [(device, dtype, t, n, *heads) for t, n in ((chunk, chunk), (chunk, 2 * chunk))]
        calls.append((device, dtype, 1, 2 * chunk + 1, *heads))
        result = verdict(kernels_used(prompt_and_a_token)[1], calls)
        return result | {"ok": result["as_expected"]}

    def passkey(length, piece):
        if length not in trials:
            trials[length] = eval_passkey.make_trial(tokenizer, length, 0)
        reset_peak(device)
        start = time.perf_counter()
        result = eval_passkey.run_trial(
            model, tokenizer, trials[length], device, prefill_chunk=piece
        )
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

    answer = eval_passkey.MAX_NEW_TOKENS  # the KV cache holds the prompt and the answer
    run.attempt(
        record,
        f"{name}: attention kernels (two prefill pieces, a decoded token)",
        kernels,
        need=2,
        estimate=estimate(2 * chunk, chunk, cache_tokens=2 * chunk + 1),
    )
    length = s["length"]
    run.attempt(
        record,
        f"{name}: passkey trial {length}",
        lambda: passkey(length, chunk),
        need=5,
        estimate=estimate(length, chunk, cache_tokens=length + answer),
    )
    run.attempt(
        record,
        f"{name}: perplexity window {length}",
        lambda: perplexity_window(length),
        need=5,
        estimate=estimate(length, None, cache_tokens=0, logits=min(eval_ppl.LOGIT_CHUNK, length)),
    )
    first = record.get(f"{name}: passkey trial {length}", {}).get("seconds", 1)
    last = {"in pieces": first, "at once": first}
    for length in s["memory_lengths"]:  # a doubled length costs up to 4x (attention is quadratic)
        for label, piece in (("in pieces", chunk), ("at once", None)):
            result = run.attempt(
                record,
                f"{name}: passkey {length} prefill {label}",
                lambda: passkey(length, piece),
                need=2 * last[label],
                estimate=estimate(length, piece, cache_tokens=length + answer),
            )
            ran = result is not None and "seconds" in result
            last[label] = result["seconds"] if ran else 4 * last[label]
