"""Perplexity with a sliding window (Press et al. 2021; PoSE Table 1), token-weighted over whole
documents.

    python eval_ppl.py --model smollm2 --data data/shakespeare --lengths 2048,4096,8192 --docs 2 \
        --out runs/ppl.json
    python eval_ppl.py --model smollm2 --rope_scaling yarn:2 --data data/shakespeare \
        --lengths 16384 --docs 2 --out runs/ppl_yarn2.json
    torchrun --nproc_per_node 2 eval_ppl.py ...  # documents split across ranks, gathered on rank 0

Documents (`data.load_corpus`: a prepared corpus, or .jsonl(.gz/.zst), .txt, a directory) are taken
in order: the first --docs of those with at least --min_tokens tokens (default: the largest
length). Each is evaluated whole; --max_tokens truncates every document to its first N tokens,
and says so. At window length L, windows ids[b : b+L] start every --stride tokens; a window scores
only the tokens no earlier window scored (the first one all tokens after its first), so every
token after the first is scored exactly once, at every L, with at least L − stride tokens of
context once past the first window. Positions restart at 0 in each window.
--bos_each_window is the authors' protocol instead (the YaRN/PoSE perplexity script): every
window is BOS and L − 1 document tokens (encoded without BOS); token 0 is scored too, from BOS.
ppl = exp(Σ NLL / Σ scored tokens) over all documents: per token, never per window. The model
returns hidden states; logits are formed only for the scored positions, 1024 at a time, so no
window needs a T × vocab tensor (and SDPA never builds a T × T one): a 32k window of
SmolLM2-135M fits in a few GB. The model flags, the resumable results file and the ranks are
machinery/evaluation.py's.
"""
import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from errors import UserError, exit_on_user_error
from machinery import data
from machinery.evaluation import Session, add_common_args, deal, pyplot, run, save

LOGIT_CHUNK = 1024  # scored positions per (chunk, vocab) fp32 logits: 200 MB for a 49k vocabulary


def windows(n_tokens, length, stride, first=1):
    """[(begin, end, first)]: the window ids[begin:end] scores the targets ids[first:end] (Press
    et al. 2021). `first`: the document's first target, 1 (token 0 has no context) or 0 (a BOS)."""
    if not 1 <= stride < length:
        raise UserError(f"stride {stride} must be ≥ 1 and < the window length {length}, or "
                        "each window's first token would go unscored")
    spans, scored_to = [], first
    for begin in range(0, n_tokens, stride):
        end = min(begin + length, n_tokens)
        spans.append((begin, end, scored_to))
        scored_to = end
        if end == n_tokens:
            break
    return spans


@torch.inference_mode()
def document_nll(model, ids, length, stride, on_window=None, bos=None):
    """ids (n,) -> (summed NLL of every scored target, number of scored targets, number of
    windows). `bos`: an id put before every window of L − 1 tokens (the authors' protocol); None:
    L tokens. `on_window`: called after each window (a progress bar's update)."""
    nll, scored = 0.0, 0
    lead = [] if bos is None else [bos]
    spans = windows(len(ids), length - len(lead), stride, first=1 - len(lead))
    for begin, end, first in spans:
        window = torch.cat([ids.new_tensor(lead), ids[begin:end]])
        h = model(window[None], hidden_only=True)[0]  # (T, dim); h[t] predicts window[t + 1]
        for start in range(first, end, LOGIT_CHUNK):
            stop = min(start + LOGIT_CHUNK, end)
            row = start - 1 - begin + len(lead)  # the hidden state just before ids[start]
            logits = model.logits(h[row: row + stop - start]).float()  # (≤ chunk, vocab)
            nll += F.cross_entropy(logits, ids[start:stop], reduction="sum").item()
        scored += end - first
        if on_window is not None:
            on_window()
    return nll, scored, len(spans)


def select_documents(corpus, min_tokens, count, max_tokens=None, strip_bos=False):
    """The first `count` documents of the store with ≥ min_tokens tokens, as token lists (cut to
    max_tokens when given); `strip_bos`: without the BOS the tokenizer put first."""
    lengths = corpus.lengths()
    chosen = np.flatnonzero(lengths >= min_tokens)[:count]
    if not len(chosen):
        raise UserError(f"none of the {len(corpus)} documents has ≥ {min_tokens} tokens (the "
                        f"longest has {lengths.max()}); lower --min_tokens or give longer "
                        "documents.")
    return [corpus[i][int(strip_bos):][:max_tokens].tolist() for i in chosen]


def plot(lengths, path):
    plt = pyplot()
    if plt is None:
        return
    xs = sorted(lengths, key=int)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([int(x) for x in xs], [lengths[x]["ppl"] for x in xs], marker="o")
    ax.set(xscale="log", yscale="log", xlabel="evaluation window (tokens)", ylabel="perplexity")
    ax.set_xticks([int(x) for x in xs], xs)
    ax.minorticks_off()
    save(fig, path)


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(
        description="Sliding-window perplexity per window length (PoSE Table 1).")
    add_common_args(p)
    p.add_argument("--data", required=True, help="a corpus from 'python -m machinery.prepare' "
                   "(memory-mapped), or .jsonl(.gz/.zst) files ('text' per line), .txt files, or "
                   "a directory of them")
    p.add_argument("--stride", type=int, default=1024,
                   help="tokens between window starts (the paper: 1024)")
    p.add_argument("--min_tokens", type=int, default=None,
                   help="only documents this long (default: the largest length)")
    p.add_argument("--docs", type=int, default=50,
                   help="how many documents (the paper: 50 per dataset)")
    p.add_argument("--max_tokens", type=int, default=None,
                   help="TRUNCATE each document to its first N tokens before the windows "
                        "(default: whole documents)")
    p.add_argument("--bos_each_window", action="store_true",
                   help="the authors' protocol: BOS + L-1 document tokens in every window, token "
                        "0 scored from BOS (default: L document tokens, encoded with the "
                        "tokenizer's own BOS setting)")
    args = p.parse_args(argv)
    largest = max(args.lengths)
    args.min_tokens = args.min_tokens or largest
    if not 1 <= args.stride < min(args.lengths) - args.bos_each_window:
        raise UserError(f"--stride {args.stride} (default 1024) must be ≥ 1 and smaller than "
                        f"every length ({min(args.lengths)}, less one for the BOS), or the first "
                        "token of each window would go unscored.")
    too_short = args.max_tokens is not None and args.max_tokens < max(largest, args.min_tokens)
    if args.docs < 1 or too_short:
        raise UserError("--docs must be ≥ 1, and --max_tokens at least the largest length and "
                        "--min_tokens.")
    if not Path(args.data).exists():  # before the model is loaded
        raise UserError(f"--data {args.data} does not exist.")
    config = {"script": "eval_ppl", **{k: getattr(args, k) for k in (
        "model", "rope_scaling", "context_len", "dtype", "data", "stride", "min_tokens", "docs",
        "max_tokens", "bos_each_window")}}
    session = Session(args, config)
    bos = session.tokenizer.bos_id if args.bos_each_window else None
    if args.bos_each_window and bos is None:
        raise UserError(f"--bos_each_window: the tokenizer of {args.model} has no BOS token.")
    try:
        corpus = data.load_corpus(args.data, session.tokenizer, progress=session.rank == 0)
        strip = args.bos_each_window and session.tokenizer.add_bos  # BOS comes before every window
        docs = select_documents(corpus, args.min_tokens, args.docs, args.max_tokens,
                                strip_bos=strip)
    except (OSError, UserError) as e:
        raise UserError(str(e) if str(args.data) in str(e) else f"{args.data}: {e}") from None
    if session.rank == 0:
        cut = (f"truncated to their first {args.max_tokens} tokens" if args.max_tokens
               else "each evaluated whole")
        short = (f" (only {len(docs)} of the {len(corpus)} reach {args.min_tokens} tokens)"
                 if len(docs) < args.docs else "")
        sizes = ", ".join(str(len(d)) for d in docs)
        print(f"{len(docs)} documents{short} of {sizes} tokens, {cut}; "
              f"windows of each length every {args.stride} tokens.")
    for length in session.todo():
        mine = deal([len(d) for d in docs], session.world, session.rank)  # ranks end together
        span = length - (bos is not None)  # document tokens a window holds
        total = sum(len(windows(len(docs[i]), span, args.stride)) for i in mine)
        with session.progress(f"ppl {length}", unit="window", total=total) as bar:
            parts = [(i, *document_nll(session.model, torch.tensor(docs[i], device=session.device),
                                       length, args.stride, on_window=bar.update, bos=bos))
                     for i in mine]
        parts = sorted(session.gather(parts))
        nll, scored = sum(p[1] for p in parts), sum(p[2] for p in parts)
        per_document = [{"index": i, "tokens": len(docs[i]), "nll": d_nll, "scored_tokens": n,
                         "ppl": math.exp(d_nll / n)} for i, d_nll, n, _ in parts]
        session.finish(length, {"ppl": math.exp(nll / scored), "nll": nll, "scored_tokens": scored,
                                "windows": sum(p[3] for p in parts), "documents": per_document})
    if session.rank == 0:
        bos_note = ", BOS before every window" if bos is not None else ""
        print(f"\nsliding-window perplexity, {args.model}, {session.rope()}, "
              f"{args.dtype}, stride {args.stride}{bos_note}")
        print(f"{'length':>8} {'ppl':>10} {'tokens':>9} {'windows':>8} {'seconds':>8}")
        for length in args.lengths:
            r = session.results["lengths"][str(length)]
            print(f"{length:>8} {r['ppl']:>10.3f} {r['scored_tokens']:>9} {r['windows']:>8} "
                  f"{r['seconds']:>8.0f}")
        if args.plot:
            plot(session.lengths(), args.plot)
    return session.results


if __name__ == "__main__":
    run(main)
