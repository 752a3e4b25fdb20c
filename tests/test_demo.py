"""The embedded default shows PoSE working: the end-to-end check that fails when the science breaks.

demo/run.py as `make demo` runs it (the shipped base, Lo = 256; PoSE to Lt = 2048 with the default 150 steps; 8,192
tokens of each of 4 held-out plays), with more passkey trials (40 a length, 8 at each of the 5 depths), then the
shapes of the paper's Table 1 and Figure 2b in miniature. Seeds are fixed. At 40 trials a 90% threshold is 3
standard errors below a true 98%, and a 50-point gap between two rates is > 5 standard errors from a true gap of
80 points. About 2.5 minutes on 2 cores.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "demo"))

from run import LO, LT, summary  # noqa: E402


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    run = subprocess.run([sys.executable, "demo/run.py", "--trials", "40", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(run.stdout[-1500:])
    return summary(out)


def test_table1_none_breaks_beyond_its_window(table):
    assert table["none"]["ppl"][LT] >= 3 * table["none"]["ppl"][LO]


def test_table1_pose_is_flat_to_the_target_length(table):
    assert table["pose"]["ppl"][LT] <= 1.15 * table["pose"]["ppl"][LO]


def test_table1_pose_keeps_short_context_quality(table):
    assert abs(table["pose"]["ppl"][LO] / table["none"]["ppl"][LO] - 1) <= 0.10


def test_figure2b_both_retrieve_within_the_original_window(table):
    assert table["none"]["passkey"][LO] >= 0.9
    assert table["pose"]["passkey"][LO] >= 0.9


def test_figure2b_pose_reaches_positions_none_cannot(table):
    """Key within the last Lo tokens of an 8·Lo prompt: the distance is one None has seen; the positions are not."""
    assert table["pose"]["near"][LT] - table["none"]["near"][LT] >= 0.5
