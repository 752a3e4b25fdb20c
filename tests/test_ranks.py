"""Evaluation on many ranks: documents dealt so the ranks finish together, and a rank that fails
says so while the others stop with a sentence, never hang."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_tiny_model
from machinery.evaluation import deal

ROOT = Path(__file__).resolve().parent.parent


def test_documents_are_dealt_so_that_the_ranks_finish_together():
    """The longest documents first, each to the least loaded rank: loads differ by at most one
    document (round-robin gave rank 0 both 64k documents here)."""
    sizes = [65536, 1024, 65536, 1024, 4096, 512, 2048]
    parts = [deal(sizes, 2, r) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(len(sizes)))  # every document once
    loads = [sum(sizes[i] for i in part) for part in parts]
    assert abs(loads[0] - loads[1]) <= 4096
    round_robin = [sum(sizes[r::2]) for r in range(2)]
    assert abs(round_robin[0] - round_robin[1]) > abs(loads[0] - loads[1])
    assert deal(sizes, 1, 0) == list(range(len(sizes)))


FAILING_RANK = """
import sys
import eval_ppl
from errors import UserError
from machinery import ranks
from machinery.evaluation import run

real = eval_ppl.document_nll

def document_nll(*args, **kwargs):
    if ranks.rank() == 1 and args[2] == 128:  # the second length, on one rank only
        raise UserError("rank 1 cannot go on (a test's failure)")
    return real(*args, **kwargs)

eval_ppl.document_nll = document_nll
sys.argv = ["eval_ppl.py", *sys.argv[1:]]
run(eval_ppl.main)
"""


@pytest.mark.slow  # torchrun, two processes
def test_a_failing_rank_says_so_and_the_others_stop_with_a_sentence(tmp_path):
    save_tiny_model(tmp_path / "base")
    (tmp_path / "worker.py").write_text(FAILING_RANK)
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text(" ".join(["the grass is green"] * 40))
    out = tmp_path / "ppl.json"
    argv = ["--model", str(tmp_path / "base"), "--data", str(tmp_path), "--lengths", "64,128",
            "--stride", "32", "--min_tokens", "600", "--timeout", "2", "--out", str(out)]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(tmp_path / "worker.py"), *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode != 0
    err = run.stderr
    assert "error: rank 1 cannot go on" in err, err
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err, err  # sentences
    assert "error: rank 0: the other ranks did not all answer" in err, err
    assert list(json.loads(out.read_text())["lengths"]) == ["64"], err  # the finished length kept
