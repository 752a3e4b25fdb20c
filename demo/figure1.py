"""Figure 1 of the paper in text and as a picture: PoSE examples (or a baseline's) in the paper's
notation, and the coverage of relative distances over K examples (desideratum 1).

    python demo/figure1.py --train_len 2048 --target_len 32768 --chunks 2 --samples 2000 \
        --plot pose.png
"""

import argparse
import sys

import torch

from errors import exit_on_user_error
from pose import CONTENTS, METHODS, boundary_mask, check, make_example


def distance_counts(position_ids, target_len):
    """counts[d]: query/key pairs at relative distance d = 0..Lt-1 (counts[0] = 0), summed over a
    batch.

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
        spikes = torch.stack([aj - bi, bj - ai + 2, aj - ai + 1, bj - bi + 1])  # (4, R, R)
        spikes += target_len
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


@exit_on_user_error
def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Print examples in Figure 1's notation and the "
        "coverage of relative distances over K examples (desideratum 1)."
    )
    ap.add_argument("--train_len", type=int, default=2048, help="Lc, tokens per training example")
    ap.add_argument("--target_len", type=int, default=32768, help="Lt, the context window to reach")
    ap.add_argument("--chunks", type=int, default=2, help="N, chunks per example (paper: 2)")
    ap.add_argument(
        "--content", default="random", choices=CONTENTS, help="v_i: Eq. 5 or Appendix A"
    )
    ap.add_argument(
        "--method", default="pose", choices=METHODS, help="PoSE or a baseline of the paper"
    )
    ap.add_argument(
        "--doc_len", type=int, default=None, help="Lx, document length (default: target_len)"
    )
    ap.add_argument("--samples", type=int, default=2000, help="K, examples for the coverage count")
    ap.add_argument("--seed", type=int, default=0, help="seed of the torch.Generator")
    ap.add_argument(
        "--plot", default=None, help="FILE.png: a Figure-1-style picture and the coverage"
    )
    a = ap.parse_args(argv)
    lx, lc, lt = a.doc_len or a.target_len, a.train_len, a.target_len
    try:
        check(a.method, lx, lc, lt, a.chunks, a.content)
        if a.plot:
            import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: --plot needs matplotlib, which is not installed: pip install matplotlib")
    g = torch.Generator().manual_seed(a.seed)
    examples = [
        make_example(a.method, lx, lc, lt, chunks=a.chunks, content=a.content, generator=g)
        for _ in range(max(a.samples, 8))
    ]
    name = f"{a.method}: Lc={lc} -> Lt={lt}"
    if a.method == "pose":
        name += f", N={a.chunks}, content={a.content}"
    print(f"{name}, Lx={lx}")
    for n, (tok, pos) in enumerate(examples[:3]):  # Figure 1: each chunk's positions and text
        chunks = runs(tok, pos)
        masked = int(boundary_mask(tok).sum())
        print(f"example {n}: {len(chunks)} chunk(s), {masked} label(s) masked")
        for i, (s, e) in enumerate(chunks[:4]):
            inside = f", relative 1..{e - s} inside" if e > s else ""
            first, last = chunks[i - 1]
            across = f", {pos[s] - pos[last]}..{pos[e] - pos[first]} to chunk {i - 1}"
            print(
                f"  chunk {i}: positions {pos[s]}..{pos[e]} (u={pos[s] - s}), "
                f"text x[{tok[s]}:{tok[e] + 1}]" + inside + across * (i > 0)
            )
        if len(chunks) > 4:
            print(f"  ... {len(chunks) - 4} more")
    counts = distance_counts(torch.stack([pos for _, pos in examples[: a.samples]]), lt)
    missing = (counts[1:] == 0).nonzero().flatten() + 1
    seen = f"{lt - 1 - len(missing)} of {lt - 1} relative distances 1..Lt-1 seen"
    percent = 100 * (1 - len(missing) / (lt - 1))
    print(
        f"coverage after K={a.samples} examples: {seen} ({percent:.4g}%; "
        "exact pair counts, from chunk ranges or by FFT)"
    )
    if len(missing):
        print(f"  never seen: {len(missing)} distance(s) from {missing[0]} to {missing[-1]}")
    print(
        f"  pairs at distance 1 per example: {counts[1] / a.samples:.1f} of Lc-1={lc - 1} "
        "(pre-training's local structure, desideratum 2)"
    )
    if not a.plot:
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5))
    for n, (tok, pos) in enumerate(examples[:8]):
        spans = [(int(pos[s]), int(pos[e] - pos[s] + 1)) for s, e in runs(tok, pos)]
        colours = [f"C{i % 10}" for i in range(len(spans))]
        top.broken_barh(spans, (n - 0.35, 0.7), facecolors=colours)
    top.set(
        ylim=(7.6, -0.6),
        ylabel="example",
        xlabel="position id (dashed: Lc)",
        title=f"{name}: one colour per chunk",
    )
    bottom.fill_between(range(lt), counts.float(), step="mid", lw=0)
    bottom.plot(missing, torch.ones(len(missing)), "|", color="red")
    bottom.set(
        yscale="log",
        xlabel="relative distance d (dashed: Lc)",
        ylabel="query/key pairs",
        title=f"K={a.samples} examples: {seen}" + " (red: never)" * (len(missing) > 0),
    )
    for ax in (top, bottom):
        ax.axvline(lc, color="gray", ls="--", lw=1)
        ax.set_xlim(0, lt)
    fig.tight_layout()
    fig.savefig(a.plot, dpi=120)
    print(f"wrote {a.plot}")


if __name__ == "__main__":
    torch.set_num_threads(1)  # tensors of a few thousand entries: a second thread only adds waiting
    main()
