"""PoSE, Positional Skip-wise Training (Zhu et al. 2023, arXiv 2309.10400), section 3.2, Eqs. 3-5.

Fine-tune with train_len (Lc) tokens per example yet teach a target_len (Lt) window: cut the Lc
positions into N chunks and push chunk i forward by a skip bias u_i. Over many examples every
relative distance 1..Lt-1 is seen (desideratum 1) while each chunk stays ordinary contiguous text
at contiguous positions, as in pre-training (desideratum 2). An example is a pair of LongTensors
(token_index, position_ids): the model reads doc[token_index] at position_ids.

    python pose.py --train_len 2048 --target_len 32768 --chunks 2 --samples 2000 --plot pose.png

Where we differ from the authors' public code (github.com/hkust-nlp/PoSE), on purpose:
- Every call draws afresh from the torch.Generator passed in; their cached preprocessing pass fixes
  each document's skips once, so every epoch repeats them. Any N; theirs has N=2 only (App. B: 2, 3, Lc).
- Chunk lengths come from N-1 distinct uniform cut points in {1..Lc-1}, so every split into N
  positive lengths is equally likely. Theirs draws the first length from [1, ceil(Lc/2)].
- The false label at a chunk boundary is masked by default (next_token_targets); theirs keeps it.
- generator=None draws from PyTorch's default generator, as torch.randint does, so torch.manual_seed
  makes it reproducible. A fresh torch.Generator() would have a fixed seed and freeze the samples.
"""
import argparse
import itertools
import random
import sys

import torch

METHODS = ("pose", "randpos", "full", "noskip")  # train.py --method; the paper's baselines
CONTENTS = ("random", "contiguous", "aligned")  # Eq. 5 and the two variants of Appendix A


def check(method, doc_len, train_len, target_len, chunks=2, content="random"):
    """Raise ValueError, in a sentence a user can act on, for arguments no example can satisfy."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if content not in CONTENTS:
        raise ValueError(f"unknown content {content!r}: choose one of {', '.join(CONTENTS)}")
    if not 1 <= train_len <= target_len:
        raise ValueError(f"need 1 <= train_len <= target_len, got train_len={train_len}, "
                         f"target_len={target_len}: PoSE extends the window, so raise target_len")
    if method == "pose" and not 1 <= chunks <= train_len:
        raise ValueError(f"chunks must be between 1 and train_len={train_len} (every chunk "
                         f"holds at least one token), got {chunks}")
    to_target = method == "full" or (method, content) == ("pose", "aligned")  # text read up to position Lt-1
    need, name = (target_len, "target_len") if to_target else (train_len, "train_len")
    what = f"method {method!r}" + (f" with content {content!r}" if method == "pose" else "")
    if doc_len < need:
        raise ValueError(f"the document has {doc_len} tokens but {what} needs at least {name}={need}: "
                         f"drop shorter documents or lower {name}"
                         + (", or use content 'random'" if content == "aligned" and method == "pose" else ""))


def chunk_lengths(train_len, chunks, rng):
    """Step 1: chunk lengths l_0..l_{N-1} >= 1 summing to Lc, cut at N-1 distinct uniform points."""
    edges = [0] + sorted(rng.sample(range(1, train_len), chunks - 1)) + [train_len]
    return [end - start for start, end in zip(edges, edges[1:])]


def nondecreasing(chunks, high, rng):
    """a_0 = 0, a_i ~ U{a_{i-1}, ..., high}: the law of skip biases (Eq. 4) and content offsets (Eq. 5).

    Each draw lands on average halfway to high, so for large N the chain reaches high after about
    ln(high) distinct values: under Eq. 4, N = Lc skips a handful of times, unlike RandPos."""
    offsets = [0]
    for _ in range(chunks - 1):
        offsets.append(rng.randint(offsets[-1], high))
    return offsets


def sample(doc_len, train_len, target_len, *, chunks=2, content="random", generator=None):
    """One PoSE example: (token_index, position_ids), LongTensors of length train_len.

    content: "random" (Eq. 5), "contiguous" (v_i = 0) or "aligned" (v_i = u_i, needs doc_len >= target_len).
    Drawn afresh on every call from generator (None: PyTorch's default generator).
    """
    check("pose", doc_len, train_len, target_len, chunks, content)
    # One draw from the torch generator seeds a Python RNG: rng.randint(a, b) is exactly U{a, …, b}
    # and costs a microsecond per chunk, where a torch call costs several.
    rng = random.Random(int(torch.randint(2**63 - 1, (), generator=generator)))
    lengths = chunk_lengths(train_len, chunks, rng)
    skip_bias = nondecreasing(chunks, target_len - train_len, rng)  # Eq. 4: u_i ~ U{u_{i-1}, …, Lt−Lc}
    if content == "random":  # Eq. 5: v_i ~ U{v_{i-1}, …, Lx−Lc}, the text skips through the document too
        content_offset = nondecreasing(chunks, doc_len - train_len, rng)
    elif content == "contiguous":  # Appendix A: v_i = 0, one unbroken run of text across the skips
        content_offset = [0] * chunks
    else:  # Appendix A: v_i = u_i, each token sits at its own position in the document
        content_offset = skip_bias
    starts = [0] + list(itertools.accumulate(lengths[:-1]))  # st_i, where chunk i starts in the example
    if chunks <= 8:  # Eq. 3: chunk i is the text x[v_i + st_i : v_i + st_i + l_i] at positions u_i + st_i, …
        token_index = torch.cat([torch.arange(v + s, v + s + n) for v, s, n in zip(content_offset, starts, lengths)])
        position_ids = torch.cat([torch.arange(u + s, u + s + n) for u, s, n in zip(skip_bias, starts, lengths)])
    else:  # the same for large N (Appendix B goes to N = Lc): token k of chunk i is x[k + v_i] at k + u_i
        offsets = torch.tensor([content_offset, skip_bias]).repeat_interleave(torch.tensor(lengths), dim=1)
        token_index, position_ids = torch.arange(train_len) + offsets
    return token_index, position_ids


def make_example(method, doc_len, train_len, target_len, *, chunks=2, content="random", generator=None):
    """(token_index, position_ids) for one training example of any method in METHODS.

    "pose": sample(). The baselines read one contiguous run of text at a random offset:
    "randpos" (Ruoss et al. 2023) puts its Lc tokens at Lc positions drawn without replacement from
    {0..Lt-1}, sorted; "full" reads Lt tokens at 0..Lt-1 (length target_len, cost grows with Lt);
    "noskip" reads Lc tokens at 0..Lc-1. chunks and content apply to "pose" only.
    """
    check(method, doc_len, train_len, target_len, chunks, content)
    if method == "pose":
        return sample(doc_len, train_len, target_len, chunks=chunks, content=content, generator=generator)
    if method == "randpos":  # O(Lt) per example: a permutation of every candidate position
        positions = torch.randperm(target_len, generator=generator)[:train_len].sort().values
    else:
        positions = torch.arange(target_len if method == "full" else train_len)
    start = int(torch.randint(doc_len - len(positions) + 1, (), generator=generator))
    return torch.arange(start, start + len(positions)), positions


def boundary_mask(token_index):
    """True at t (length L-1) where token t+1 is not the document's next token: v jumped there (Eq. 5)."""
    return token_index[..., 1:] != token_index[..., :-1] + 1


def next_token_targets(tokens, token_index, *, keep_boundary=False, ignore_index=-100):
    """targets[t] = tokens[t+1] (same shape as tokens), ignore_index at the last position.

    Where the content offset jumps (v_i > v_{i-1}) the next token of the example is not the next
    token of the text: the label is false text, so by default we mask it. It costs one label per
    chunk boundary (N-1 of Lc). keep_boundary=True keeps it, as the authors' code does. Where
    only the position jumps (v_i = v_{i-1}) the label is true and kept: predicting across the skip
    is what the example teaches. Baselines read contiguous text, so nothing is masked for them.
    """
    targets = torch.full_like(tokens, ignore_index)
    targets[..., :-1] = tokens[..., 1:]
    if not keep_boundary:
        targets[..., :-1].masked_fill_(boundary_mask(token_index), ignore_index)
    return targets


def distance_counts(position_ids, target_len):
    """counts[d]: query/key pairs at relative distance d = 0..Lt-1 (counts[0] = 0), summed over a batch.

    position_ids: one example (L,) or K of them (K, L). Desideratum 1 holds when counts[1:] > 0.
    Examples with few runs of consecutive positions (PoSE) are counted exactly from the chunk ranges
    in O(N^2); others (RandPos) exactly by FFT autocorrelation, O(Lt log Lt), never an L x L matrix.
    """
    second = torch.zeros(2 * target_len + 2, dtype=torch.long)  # d + Lt indexes d in -Lt..Lt+1
    power = torch.zeros(target_len + 1, dtype=torch.float64)  # rfft of 2 Lt points: no wrap-around
    for p in position_ids.reshape(-1, position_ids.shape[-1]):
        breaks = (p.diff() != 1).nonzero().flatten()
        if len(breaks) >= 64:  # sum of |FFT|^2 = sum of autocorrelations, inverted once below
            present = torch.zeros(2 * target_len, dtype=torch.float64).index_fill_(0, p, 1.0)
            power += torch.fft.rfft(present).abs() ** 2
            continue
        a = p[torch.cat([torch.tensor([0]), breaks + 1])]  # first position of each run (chunk)
        b = p[torch.cat([breaks, torch.tensor([len(p) - 1])])]  # last position
        # Pairs (key in run i, query in run j) at distance d form a trapezoid over d, two boxes
        # convolved. Its second difference is four spikes: +1 at a_j-b_i and b_j-a_i+2, -1 at
        # a_j-a_i+1 and b_j-b_i+1, so two running sums rebuild every count exactly (i=j: in-chunk).
        ai, bi, aj, bj = a[:, None], b[:, None], a[None], b[None]
        spikes = torch.stack([aj - bi, bj - ai + 2, aj - ai + 1, bj - bi + 1]) + target_len  # (4, R, R)
        signs = torch.tensor([1, 1, -1, -1])[:, None, None].expand_as(spikes)
        second.index_add_(0, spikes.flatten(), signs.flatten())
    counts = second.cumsum(0).cumsum(0)[target_len : 2 * target_len]  # d < 0 (i > j) dropped
    counts += torch.fft.irfft(power, n=2 * target_len)[:target_len].round().long()
    counts[0] = 0  # a token and itself
    return counts


def runs(token_index, position_ids):
    """(first, last) index of each chunk: maximal runs where text and position both step by 1."""
    ends = ((token_index.diff() != 1) | (position_ids.diff() != 1)).nonzero().flatten().tolist()
    return list(zip([0] + [e + 1 for e in ends], ends + [len(position_ids) - 1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Print examples in Figure 1's notation and the coverage of "
                                 "relative distances over K examples (desideratum 1).")
    ap.add_argument("--train_len", type=int, default=2048, help="Lc, tokens per training example")
    ap.add_argument("--target_len", type=int, default=32768, help="Lt, the context window to reach")
    ap.add_argument("--chunks", type=int, default=2, help="N, chunks per example (paper: 2)")
    ap.add_argument("--content", default="random", choices=CONTENTS, help="v_i: Eq. 5 or Appendix A")
    ap.add_argument("--method", default="pose", choices=METHODS, help="PoSE or a baseline of the paper")
    ap.add_argument("--doc_len", type=int, default=None, help="Lx, document length (default: target_len)")
    ap.add_argument("--samples", type=int, default=2000, help="K, examples for the coverage count")
    ap.add_argument("--seed", type=int, default=0, help="seed of the torch.Generator")
    ap.add_argument("--plot", default=None, help="FILE.png: a Figure-1-style picture and the coverage")
    a = ap.parse_args(argv)
    lx, lc, lt = a.doc_len or a.target_len, a.train_len, a.target_len
    try:
        check(a.method, lx, lc, lt, a.chunks, a.content)
        if a.plot:
            import matplotlib.pyplot as plt
    except ValueError as e:
        sys.exit(f"error: {e}")
    except ImportError:
        sys.exit("error: --plot needs matplotlib, which is not installed: pip install matplotlib")
    g = torch.Generator().manual_seed(a.seed)
    examples = [make_example(a.method, lx, lc, lt, chunks=a.chunks, content=a.content, generator=g)
                for _ in range(max(a.samples, 8))]
    name = f"{a.method}: Lc={lc} -> Lt={lt}" + (f", N={a.chunks}, content={a.content}" * (a.method == "pose"))
    print(f"{name}, Lx={lx}")
    for n, (tok, pos) in enumerate(examples[:3]):  # Figure 1: each chunk's positions and text
        chunks = runs(tok, pos)
        print(f"example {n}: {len(chunks)} chunk(s), {int(boundary_mask(tok).sum())} label(s) masked")
        for i, (s, e) in enumerate(chunks[:4]):
            inside = f", relative 1..{e - s} inside" if e > s else ""
            across = f", {pos[s] - pos[chunks[i - 1][1]]}..{pos[e] - pos[chunks[i - 1][0]]} to chunk {i - 1}"
            print(f"  chunk {i}: positions {pos[s]}..{pos[e]} (u={pos[s] - s}), text x[{tok[s]}:{tok[e] + 1}]"
                  + inside + across * (i > 0))
        if len(chunks) > 4:
            print(f"  ... {len(chunks) - 4} more")
    counts = distance_counts(torch.stack([pos for _, pos in examples[: a.samples]]), lt)
    missing = (counts[1:] == 0).nonzero().flatten() + 1
    seen = f"{lt - 1 - len(missing)} of {lt - 1} relative distances 1..Lt-1 seen"
    print(f"coverage after K={a.samples} examples: {seen} ({100 * (1 - len(missing) / (lt - 1)):.4g}%; "
          "exact pair counts, from chunk ranges or by FFT)")
    if len(missing):
        print(f"  never seen: {len(missing)} distance(s) from {missing[0]} to {missing[-1]}")
    print(f"  pairs at distance 1 per example: {counts[1] / a.samples:.1f} of Lc-1={lc - 1} "
          "(pre-training's local structure, desideratum 2)")
    if not a.plot:
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5))
    for n, (tok, pos) in enumerate(examples[:8]):
        spans = [(int(pos[s]), int(pos[e] - pos[s] + 1)) for s, e in runs(tok, pos)]
        top.broken_barh(spans, (n - 0.35, 0.7), facecolors=[f"C{i % 10}" for i in range(len(spans))])
    top.set(ylim=(7.6, -0.6), ylabel="example", xlabel="position id (dashed: Lc)",
            title=f"{name}: one colour per chunk")
    bottom.fill_between(range(lt), counts.float(), step="mid", lw=0)
    bottom.plot(missing, torch.ones(len(missing)), "|", color="red")
    bottom.set(yscale="log", xlabel="relative distance d (dashed: Lc)", ylabel="query/key pairs",
               title=f"K={a.samples} examples: {seen}" + " (red: never)" * (len(missing) > 0))
    for ax in (top, bottom):
        ax.axvline(lc, color="gray", ls="--", lw=1)
        ax.set_xlim(0, lt)
    fig.tight_layout()
    fig.savefig(a.plot, dpi=120)
    print(f"wrote {a.plot}")


if __name__ == "__main__":
    torch.set_num_threads(1)  # tensors of a few thousand entries: a second thread only adds waiting
    main()
