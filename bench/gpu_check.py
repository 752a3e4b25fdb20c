"""One prepared GPU check: the CUDA path validated and measured in one run of at most 8 minutes.

    python bench/gpu_check.py --out runs/gpu_check            # one GPU: sections a-e in <= 450 s
    python bench/gpu_check.py --dry --out runs/gpu_check_dry  # CPU, tiny sizes: what CI runs

a  correctness: logits of tiny models (MHA and GQA, tied and untied, every RoPE scaling) against
   transformers in fp32 and bf16; the KV cache at PoSE positions, filled in pieces, against one
   forward; the chunked prefill against one pass; the chunked loss against F.cross_entropy; the
   attention kernel of each path, forward and backward, asserted
b  train.py: bf16, --compile, activation checkpointing, 20 steps; the same run SIGKILLed in step 13
   and resumed, against the uninterrupted one; then in a slot of its own, FSDP2 at world size 1:
   `torchrun --fsdp` with the same bf16 --compile settings against the uninterrupted run, and in
   fp32 (rank 0 of 1 in torchrun's environment) against the plain path
c  throughput of a random-init 1.1B LLaMA (TinyLlama's shape) at Lc = 2048: ours eager and
   compiled against transformers (sdpa), same batch and weights: tokens/s, MFU, peak memory
d  Figure 3: one training step of that model, PoSE (Lc 2048) against Full-length, Lt 2k ... 128k:
   time and peak memory (Full-length until its estimate exceeds the card, it runs out of memory,
   or the time left cannot hold the next length)
e  evaluation at length, random-init LLaMA-7B (32 heads) and Llama-3-8B (8 KV heads, GQA) in the
   eval scripts' dtype, each in its own slot: the attention kernels of a prefill in two pieces and
   a decoded token, asserted; a passkey trial and a perplexity window at 32k (time); a passkey
   trial's peak memory at 64k and 128k, the prompt prefilled in pieces and at once

Every section, and every step inside one, is isolated: an exception (out of memory included) is
recorded with its message and the rest runs on. Each section has a time budget, and slots inside
one keep a later step's time (b's FSDP2 runs, e's second model); a step starts only when the time
it needs is left, and train.py's processes are killed at their slot's end (skipped for time, not
failed; one past its own hang limit is an error). A size the card cannot hold is computed before
it runs (bench/gpucheck/fit.py: weights, KV cache, one prefill piece's activations, against
torch.cuda.mem_get_info) and recorded as that limit with its estimate, not as a failure.
OUT/gpu_check.json and OUT/summary.txt, which name the device and torch's version, are rewritten
after every section. The dry mode runs the same functions on the CPU at tiny sizes (its section e
on a pretended 24 MiB card, so that one size is a limit). Nothing comes from the network: models
are random-init (saved to a temporary directory where a file is needed), the tokenizer is
demo/base's, the training text is generated. Sections a and c need transformers (from_pretrained's
dtype keyword as the installed release names it: torch_dtype before 4.56); flash_attn is optional
and reported. Exit status 0 when every check passed, whatever the card's memory; goals are
reported only. No GPU has run this script yet: its CUDA paths are untested.

Each section is a module of bench/gpucheck/ (a_correctness.py ... e_evaluation.py); what they share
(the sizes, the run, the summary, the training step of c and d) is bench/gpucheck/common.py, the
memory estimates fit.py, the attention kernels seen and expected kernels.py.
"""

import argparse
import shutil
import sys

import torch

from bench.gpucheck.a_correctness import section_a
from bench.gpucheck.b_train import section_b
from bench.gpucheck.c_throughput import section_c
from bench.gpucheck.common import Run, failures, summary
from bench.gpucheck.d_figure3 import section_d
from bench.gpucheck.e_evaluation import section_e


def main(argv=None):
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(
        description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="directory for gpu_check.json and summary.txt")
    p.add_argument(
        "--dry",
        action="store_true",
        help="CPU, tiny sizes: every step of the GPU run, to catch rot (a few minutes)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run (default: 450; dry: 3000, never cut short)",
    )
    p.add_argument("--sections", default="abcde", help="which sections to run, e.g. ab")
    a = p.parse_args(argv)
    if not a.dry and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; run with --dry for the CPU rehearsal.")
    if unknown := set(a.sections) - set("abcde"):
        sys.exit(f"error: --sections takes letters of abcde, not {''.join(sorted(unknown))}.")
    if a.dry:  # tiny matrices: more threads only wait
        torch.set_num_threads(1)
    run = Run(a.out, a.dry, a.budget or (3000 if a.dry else 450))
    functions = {"a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e}
    try:
        for name in a.sections:
            print(f"[{name}] {functions[name].__doc__.strip()}", flush=True)
            run.section(name, functions[name])
            print(f"[{name}] done in {run.results['sections'][name]['seconds']} s", flush=True)
    finally:
        shutil.rmtree(run.tmp, ignore_errors=True)
        run.save()
    print(summary(run.results))
    print(f"wrote {run.out / 'gpu_check.json'} and {run.out / 'summary.txt'}")
    return 1 if failures(run.results) else 0


if __name__ == "__main__":
    sys.exit(main())
