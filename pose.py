"""PoSE, Positional Skip-wise Training (Zhu et al. 2023, arXiv 2309.10400), section 3.2, Eqs. 3-5.

Fine-tune with train_len (Lc) tokens per example yet teach a target_len (Lt) window: cut the Lc
positions into N chunks and push chunk i forward by a skip bias u_i. Over many examples every
relative distance 1..Lt-1 is seen (desideratum 1) while each chunk stays ordinary contiguous text
at contiguous positions, as in pre-training (desideratum 2). An example is a pair of LongTensors
(token_index, position_ids): the model reads doc[token_index] at position_ids.

demo/figure1.py prints and draws examples in Figure 1's notation and counts the relative
distances they cover.

Where we differ from the authors' public code (github.com/hkust-nlp/PoSE), on purpose:
- Every call draws afresh from the torch.Generator passed in; their cached preprocessing pass fixes
  each document's skips once, so every epoch repeats them. Any N; their code has N=2 only
  (Appendix B compares N = 2, 3 and Lc).
- Chunk lengths come from N-1 distinct uniform cut points in {1..Lc-1}, so every split into N
  positive lengths is equally likely. Theirs draws the first length from [1, ceil(Lc/2)].
- The false label at a chunk boundary is masked by default (next_token_targets); theirs keeps it.
- generator=None draws from PyTorch's default generator, as torch.randint does, so torch.manual_seed
  makes it reproducible. A fresh torch.Generator() would have a fixed seed and freeze the samples.
"""
import itertools
import random

import torch

from errors import UserError

METHODS = ("pose", "randpos", "full", "noskip")  # train.py --method; the paper's baselines
CONTENTS = ("random", "contiguous", "aligned")  # Eq. 5 and the two variants of Appendix A


def check(method, doc_len, train_len, target_len, chunks=2, content="random"):
    """Raise UserError, in a sentence a user can act on, for arguments no example can satisfy."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if content not in CONTENTS:
        raise UserError(f"unknown content {content!r}: choose one of {', '.join(CONTENTS)}")
    if not 1 <= train_len <= target_len:
        raise UserError(f"need 1 <= train_len <= target_len, got train_len={train_len}, "
                        f"target_len={target_len}: PoSE extends the window, so raise target_len")
    if method == "pose" and not 1 <= chunks <= train_len:
        raise UserError(f"chunks must be between 1 and train_len={train_len} (every chunk "
                        f"holds at least one token), got {chunks}")
    need = min_doc_len(method, train_len, target_len, content)
    name = "train_len" if need == train_len else "target_len"
    what = f"method {method!r}" + (f" with content {content!r}" if method == "pose" else "")
    if doc_len < need:
        aligned = content == "aligned" and method == "pose"
        raise UserError(f"the document has {doc_len} tokens but {what} needs at least "
                        f"{name}={need}: drop shorter documents or lower {name}"
                        + (", or use content 'random'" if aligned else ""))


def min_doc_len(method, train_len, target_len, content="random"):
    """Lx, the fewest tokens a document needs: Lt where the text is read up to position Lt-1
    ("full", and PoSE with "aligned" content), else Lc."""
    return target_len if method == "full" or (method, content) == ("pose", "aligned") else train_len


def chunk_lengths(train_len, chunks, rng):
    """Chunk lengths l_0..l_{N-1} >= 1 summing to Lc, cut at N-1 distinct uniform points."""
    edges = [0] + sorted(rng.sample(range(1, train_len), chunks - 1)) + [train_len]
    return [end - start for start, end in zip(edges, edges[1:])]


def nondecreasing(chunks, high, rng):
    """a_0 = 0, a_i ~ U{a_{i-1}, ..., high}: the law of skip biases (Eq. 4) and content offsets
    (Eq. 5).

    Each draw lands on average halfway to high, so for large N the chain reaches high after about
    ln(high) distinct values: under Eq. 4, N = Lc skips a handful of times, unlike RandPos."""
    offsets = [0]
    for _ in range(chunks - 1):
        offsets.append(rng.randint(offsets[-1], high))
    return offsets


def sample(doc_len, train_len, target_len, *, chunks=2, content="random", generator=None):
    """One PoSE example: (token_index, position_ids), LongTensors of length train_len.

    content: "random" (Eq. 5), "contiguous" (v_i = 0) or "aligned" (v_i = u_i, needs
    doc_len >= target_len).
    Drawn afresh on every call from generator (None: PyTorch's default generator).
    """
    check("pose", doc_len, train_len, target_len, chunks, content)
    # One draw from the torch generator seeds a Python RNG: rng.randint(a, b) is exactly U{a, …, b}
    # and costs a microsecond per chunk, where a torch call costs several.
    rng = random.Random(int(torch.randint(2**63 - 1, (), generator=generator)))
    lengths = chunk_lengths(train_len, chunks, rng)
    # Eq. 4: u_i ~ U{u_{i-1}, …, Lt−Lc}
    skip_bias = nondecreasing(chunks, target_len - train_len, rng)
    if content == "random":  # Eq. 5: v_i ~ U{v_{i-1}, …, Lx−Lc}, the text skips through it too
        content_offset = nondecreasing(chunks, doc_len - train_len, rng)
    elif content == "contiguous":  # Appendix A: v_i = 0, one unbroken run of text across the skips
        content_offset = [0] * chunks
    else:  # Appendix A: v_i = u_i, each token sits at its own position in the document
        content_offset = skip_bias
    starts = itertools.accumulate(lengths[:-1], initial=0)  # st_i: where chunk i starts
    # chunk i: the text x[v_i + st_i : v_i + st_i + l_i] (Eq. 5) at positions u_i + st_i, … (Eq. 3)
    pieces = [(torch.arange(v + st, v + st + n), torch.arange(u + st, u + st + n))
              for v, u, st, n in zip(content_offset, skip_bias, starts, lengths)]
    token_index, position_ids = (torch.cat(parts) for parts in zip(*pieces))
    return token_index, position_ids


def make_example(method, doc_len, train_len, target_len, *, chunks=2, content="random",
                 generator=None):
    """(token_index, position_ids) for one training example of any method in METHODS.

    "pose": sample(). The baselines read one contiguous run of text at a random offset:
    "randpos" (Ruoss et al. 2023) puts its Lc tokens at Lc positions drawn without replacement from
    {0..Lt-1}, sorted; "full" reads Lt tokens at 0..Lt-1 (length target_len, cost grows with Lt);
    "noskip" reads Lc tokens at 0..Lc-1. chunks and content apply to "pose" only.
    """
    if method == "pose":  # sample() checks its arguments
        return sample(doc_len, train_len, target_len, chunks=chunks, content=content,
                      generator=generator)
    check(method, doc_len, train_len, target_len, chunks, content)
    if method == "randpos":  # O(Lt) per example: a permutation of every candidate position
        positions = torch.randperm(target_len, generator=generator)[:train_len].sort().values
    else:
        positions = torch.arange(target_len if method == "full" else train_len)
    start = int(torch.randint(doc_len - len(positions) + 1, (), generator=generator))
    return torch.arange(start, start + len(positions)), positions


def boundary_mask(token_index):
    """True at t (length L-1) where token t+1 is not the document's next token: v jumped there
    (Eq. 5)."""
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
