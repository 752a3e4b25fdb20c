"""The PoSE sampler (pose.py) against section 3.2 of the paper, one property per test; the
coverage counter and the Figure-1 command line of demo/figure1.py.

    python -m pytest -q tests/test_pose.py
"""

import math

import pytest
import torch

import pose
from demo import figure1

LC, LT, LX = 64, 1024, 4096  # train_len, target_len, doc_len: tiny but with room to skip
SETTINGS = [(n, c) for n in (1, 2, 3, 16, LC) for c in pose.CONTENTS]  # (chunks, content)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def draws(
    n, *, chunks=2, content="random", seed=0, doc_len=LX, train_len=LC, target_len=LT, method="pose"
):
    g = torch.Generator().manual_seed(seed)
    return [
        pose.make_example(
            method, doc_len, train_len, target_len, chunks=chunks, content=content, generator=g
        )
        for _ in range(n)
    ]


def breaks(x):  # how many times x does not step by exactly 1
    return int((x.diff() != 1).sum())


def chi2_critical(df, z=3.0902):
    """Upper 0.1% point of chi-square(df) by Wilson-Hilferty (tables: df=19 -> 43.82, this gives
    43.95)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(values, support):  # Pearson's statistic of values against the uniform law on support
    observed = torch.bincount(torch.tensor(values) - support[0], minlength=len(support)).double()
    assert len(observed) == len(support), "a value fell outside the support"
    expected = len(values) / len(support)
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("chunks,content", SETTINGS)
def test_positions_strictly_increase_from_zero_and_stay_below_target_len(chunks, content):
    for tok, pos in draws(50, chunks=chunks, content=content):
        assert tok.dtype == pos.dtype == torch.long and len(tok) == len(pos) == LC
        assert pos[0] == 0 and pos[-1] <= LT - 1  # u_0 = 0; u_{N-1} <= Lt - Lc
        assert bool((pos.diff() >= 1).all())


@pytest.mark.parametrize("chunks,content", SETTINGS)
def test_positions_and_text_are_contiguous_inside_at_most_n_chunks(chunks, content):
    for tok, pos in draws(50, chunks=chunks, content=content):
        # every break of text or position is a chunk boundary, and there are N - 1 of those
        assert int(((tok.diff() != 1) | (pos.diff() != 1)).sum()) <= chunks - 1


@pytest.mark.parametrize("chunks,content", SETTINGS)
def test_token_index_increases_inside_the_document(chunks, content):
    for tok, _ in draws(50, chunks=chunks, content=content):
        assert bool((tok.diff() >= 1).all()) and tok[0] >= 0 and tok[-1] <= LX - 1


def test_target_len_equal_to_train_len_gives_plain_positions():
    for _, pos in draws(20, chunks=3, target_len=LC):
        assert torch.equal(pos, torch.arange(LC))


def test_one_chunk_gives_plain_positions():
    for tok, pos in draws(20, chunks=1):
        # u_0 = v_0 = 0
        assert torch.equal(pos, torch.arange(LC)) and torch.equal(tok, torch.arange(LC))


def test_chunks_equal_to_train_len_follow_eq_4():
    """Appendix B's N = Lc: every chunk is one token. Eq. 4's nested draws u_i ~ U{u_{i-1}, ...,
    Lt-Lc} reach Lt-Lc after about H(Lt-Lc+1) ~ ln(961) + 0.58 = 7.4 distinct values, so an example
    skips about 7 times, not Lc times as independent sorted draws would."""
    examples = draws(40, chunks=LC)
    for tok, pos in examples:
        assert bool((pos.diff() >= 1).all()) and pos[-1] <= LT - 1 and bool((tok.diff() >= 1).all())
    assert 4 < sum(breaks(pos) for _, pos in examples) / len(examples) < 11


def test_skip_bias_content_offset_and_cut_point_are_uniform():
    """Eq. 4 and 5 at N=2: u_1 ~ U{0..Lt-Lc}, v_1 ~ U{0..Lx-Lc}; the cut l_0 ~ U{1..Lc-1}."""
    train_len, target_len, doc_len, n = 16, 35, 40, 4000
    examples = draws(n, train_len=train_len, target_len=target_len, doc_len=doc_len, seed=1)
    # the last position is u_1 + Lc - 1
    skip = [int(pos[-1]) - (train_len - 1) for _, pos in examples]
    offset = [int(tok[-1]) - (train_len - 1) for tok, _ in examples]
    # l_0 shows where positions break; u_1 is independent of it, so keeping u_1 > 0 keeps it uniform
    cut = [int((pos.diff() != 1).nonzero()[0]) + 1 for _, pos in examples if breaks(pos)]
    for values, support in [
        (skip, range(target_len - train_len + 1)),
        (offset, range(doc_len - train_len + 1)),
        (cut, range(1, train_len)),
    ]:
        assert chi2(values, support) < chi2_critical(len(support) - 1)
    # a skewed law is rejected
    assert chi2([min(v, 9) for v in skip], range(20)) > chi2_critical(19)


def test_every_relative_distance_is_covered():
    """Desideratum 1. Lt = 256 so that K = 3000 examples suffice: the largest distance Lt - 1 needs
    u_1 = Lt - Lc exactly, probability 1/193 per example."""
    examples = draws(3000, target_len=256)
    counts = figure1.distance_counts(torch.stack([pos for _, pos in examples]), 256)
    assert bool((counts[1:] > 0).all())
    few = figure1.distance_counts(torch.stack([pos for _, pos in examples[:50]]), 256)
    assert bool((few[200:] == 0).any())  # and it takes many examples: 50 leave gaps


def test_randpos_covers_distances_too_but_pose_keeps_the_chunks_contiguous():
    """Both satisfy desideratum 1; only PoSE keeps pre-training's local structure (desideratum 2):
    it has at least Lc - N adjacent positions per example, RandPos about Lc(Lc-1)/Lt."""
    k, target_len = 400, 256  # distance Lt-1 needs positions 0 and Lt-1: 1 in 16 RandPos examples
    pose_counts = figure1.distance_counts(
        torch.stack([p for _, p in draws(k, target_len=target_len)]), target_len
    )
    randpos = draws(k, target_len=target_len, method="randpos")
    rand_counts = figure1.distance_counts(torch.stack([p for _, p in randpos]), target_len)
    # PoSE's coverage: test_every_relative_distance_is_covered
    assert bool((rand_counts[1:] > 0).all())
    assert pose_counts[1] >= k * (LC - 2)
    expected = k * LC * (LC - 1) / target_len  # pairs of consecutive positions both drawn
    assert abs(float(rand_counts[1]) - expected) < 0.1 * expected
    # its text is contiguous: all labels are true
    assert all(breaks(tok) == 0 for tok, _ in randpos)


@pytest.mark.parametrize("method,chunks", [("pose", 3), ("randpos", 2)])
def test_distance_counts_equal_brute_force(method, chunks):
    train_len, target_len = 128, 1024  # RandPos here has > 64 runs: the FFT path
    examples = draws(5, method=method, chunks=chunks, train_len=train_len, target_len=target_len)
    batch = torch.stack([pos for _, pos in examples])
    d = batch[:, None, :] - batch[:, :, None]  # (K, L, L): key to query distances
    assert torch.equal(
        figure1.distance_counts(batch, target_len), torch.bincount(d[d > 0], minlength=target_len)
    )


@pytest.mark.parametrize("chunks", [2, 16])  # few chunks and many
def test_content_modes(chunks):
    for tok, pos in draws(50, chunks=chunks, content="contiguous"):
        assert torch.equal(tok, torch.arange(LC)) and breaks(pos) > 0  # v_i = 0 while u_i > 0
    for tok, pos in draws(50, chunks=chunks, content="aligned"):
        assert torch.equal(tok, pos)  # v_i = u_i
    for tok, pos in draws(50, chunks=chunks, content="random"):
        assert breaks(tok) > 0 and not torch.equal(tok, pos)  # v_1 > 0, drawn apart from u (Eq. 5)


def test_same_seed_same_samples_and_every_call_draws_afresh():
    first, again = draws(20, seed=7), draws(20, seed=7)
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert len({tuple(pos.tolist()) for _, pos in first}) == 20  # never a cached or frozen example
    # generator=None: PyTorch's default generator, torch.manual_seed rules
    with torch.random.fork_rng():
        torch.manual_seed(3)
        a = pose.sample(LX, LC, LT)
        torch.manual_seed(3)
        assert torch.equal(a[1], pose.sample(LX, LC, LT)[1])


def test_boundary_mask_marks_text_jumps_not_position_jumps():
    for tok, pos in draws(30, chunks=3, content="aligned"):  # v jumps exactly where u does
        assert torch.equal(pose.boundary_mask(tok), pos.diff() != 1)
    for tok, pos in draws(30, chunks=3, content="contiguous"):  # positions skip, text does not
        assert not pose.boundary_mask(tok).any()


def test_targets_are_the_documents_next_tokens_or_masked():
    doc = torch.randperm(LX, generator=torch.Generator().manual_seed(0))  # distinct tokens
    masked = 0
    for tok, _ in draws(50, chunks=3):
        targets = pose.next_token_targets(doc[tok], tok)
        kept = targets != -100
        # true text only
        assert targets[-1] == -100 and torch.equal(targets[kept], doc[tok[kept] + 1])
        assert int((~kept[:-1]).sum()) == breaks(tok) <= 2  # one label per text jump, nothing else
        masked += breaks(tok)
        kept_all = pose.next_token_targets(doc[tok], tok, keep_boundary=True)  # the authors' choice
        assert torch.equal(kept_all[:-1], doc[tok][1:])
    assert masked > 50  # the test did see boundaries


@pytest.mark.parametrize("method", pose.METHODS)
def test_every_method_gives_increasing_positions_below_target_len(method):
    for tok, pos in draws(20, method=method):
        assert len(tok) == len(pos) == (LT if method == "full" else LC)
        assert bool((pos.diff() >= 1).all()) and 0 <= pos[0] and pos[-1] <= LT - 1
        assert bool((tok.diff() >= 1).all()) and 0 <= tok[0] and tok[-1] <= LX - 1


def test_baselines():
    assert all(
        torch.equal(pos, torch.arange(LT)) and breaks(tok) == 0
        for tok, pos in draws(5, method="full")
    )
    assert all(
        torch.equal(pos, torch.arange(LC)) and breaks(tok) == 0
        for tok, pos in draws(5, method="noskip")
    )
    starts = {int(tok[0]) for tok, _ in draws(20, method="noskip")}
    assert len(starts) > 10  # the text run starts at a random offset
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(
        pose.make_example("pose", LX, LC, LT, generator=g1)[1],
        pose.sample(LX, LC, LT, generator=g2)[1],
    )


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        (("pose", LC - 1, LC, LT), {}, "drop shorter documents or lower train_len"),
        (("pose", LT - 1, LC, LT), {"content": "aligned"}, "lower target_len"),
        (("full", LT - 1, LC, LT), {}, "needs at least target_len"),
        (("pose", LX, LC, LC - 1), {}, "raise target_len"),
        (("pose", LX, LC, LT), {"chunks": 0}, "chunks must be between 1"),
        (("pose", LX, LC, LT), {"chunks": LC + 1}, "chunks must be between 1"),
        (("pose", LX, LC, LT), {"content": "shuffled"}, "choose one of random"),
        (("yarn", LX, LC, LT), {}, "choose one of pose"),
    ],
)
def test_bad_input_raises_a_value_error_that_says_what_to_do(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pose.make_example(*args, **kwargs)


def test_cli_prints_examples_and_coverage(capsys):
    figure1.main(["--train_len", "64", "--target_len", "256", "--samples", "300", "--chunks", "3"])
    out = capsys.readouterr().out
    assert "chunk 0: positions 0.." in out and "coverage after K=300 examples" in out


def test_cli_explains_bad_input_without_traceback(capsys):
    with pytest.raises(SystemExit) as exit:
        figure1.main(["--train_len", "64", "--target_len", "32"])
    assert exit.value.code != 0 and "raise target_len" in str(exit.value.code)
