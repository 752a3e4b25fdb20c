"""bench/gpu_check.py's dry mode: every step of the one-GPU check runs on the CPU at tiny sizes and
passes, so the script does not rot between the rare runs on a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # left out by pytest -m "not slow"; make test runs it

ROOT = Path(__file__).resolve().parent.parent


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
    assert "all passed, no errors" in summary
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
    assert a["kv cache at PoSE positions float32"]["kernels"]["piece after a cache (T < S)"]
    assert b["SIGKILL in step 5"]["killed"] and b["SIGKILL in step 5"]["checkpoint_step"] == 4
    assert b["resumed equals uninterrupted"]["bitwise"] and b["FSDP2 equals plain"]["fsdp_in_log"]
    for impl in ("ours", "ours+compile", "transformers"):
        assert c[impl]["tokens_per_s"] > 0 and c[impl]["peak_gib"] > 0
    # the same weights and batch: the same loss
    assert abs(c["ours"]["loss_after_warm_up"] - c["transformers"]["loss_after_warm_up"]) < 1e-4
    assert {f"{m} Lt={n}" for m in ("pose", "full") for n in (64, 128, 256)} <= set(d)
    pieces, at_once = e["passkey 2048 prefill in pieces"], e["passkey 2048 prefill at once"]
    assert pieces["answer"] == at_once["answer"] and pieces["prompt_tokens"] == 2048
