"""The embedded default: the paper's experiment in miniature, on a CPU in minutes (`make demo` runs
this).

    python demo/run.py                # PoSE-extend demo/base from Lo=256 to Lt=2048, evaluate, plot
    python demo/run.py --trials 40 --out DIR     # what tests/test_demo.py runs and checks
    python demo/run.py --method randpos --out runs/demo-randpos   # a baseline
    python demo/run.py --scaling linear --out runs/demo-linear    # or --chunks, --content
    python demo/run.py --data plays --method noskip --out runs/variants/plays-noskip   # no skip

demo/base is a tiny LLaMA (0.7M parameters) pretrained from scratch at Lo = 256 tokens by
demo/build_base.py, which learns retrieval from episodes in other words than the passkey
evaluation's. PoSE fine-tunes it with train_len = Lo = 256 (Lc) for target_len = 8·Lo = 2048 (Lt) on
the base's own last pretraining mixture (--data mix: the training plays and as many such episodes;
as the paper fine-tunes LLaMA on the Pile): positions jump inside 256-token examples (Eqs. 3-5) and
RoPE is scaled by s = 8 (YaRN here; the paper's default is linear). No stage, pretraining or
fine-tuning, holds a sentence of the evaluation's prompt. Then both the base model ("none") and the
fine-tuned one are scored like the paper's Table 1 (sliding-window perplexity on four held-out
plays) and Figure 2b (passkey retrieval, by length and depth, and with the key within the last Lo
tokens). Every step is one of the project's own commands, printed before it runs; results are JSON
and PNG under --out, and a rerun with the same --out resumes (finished steps are skipped).
"""

import argparse
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

from errors import exit_on_user_error

ROOT = Path(__file__).resolve().parent.parent

LO, LT = 256, 2048
LENGTHS = [LO, 2 * LO, 4 * LO, 8 * LO]
DEPTHS = "0,0.25,0.5,0.75,1"


def run(*args):
    command = [sys.executable, *map(str, args)]
    print("$ " + " ".join(str(a) for a in args), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        sys.exit(
            f"error: {args[0]} failed (its message is above); rerun demo/run.py to resume where it "
            "stopped."
        )


def fine_tuning_data(out, base, method="pose", data="mix"):
    """The training plays cut into pieces and, with --data mix (the base's last pretraining
    mixture), four times over with as many retrieval episodes in other words than the evaluation's.
    --data plays+episodes: the plays and as many passkey episodes in eval_passkey's own template
    (the evaluation's prompt is then a trained task); --data plays: the plays alone. --method full
    needs documents of Lt tokens: pieces four times as long and episodes filled to Lt tokens."""
    from machinery.texts import fetch_shakespeare
    from demo.build_base import (
        PIECE_CHARS,
        faithful_mixture,
        passkey_episode,
        pieces,
        split_plays,
        write_jsonl,
    )
    from machinery.tokenizer import load_tokenizer

    train, held = split_plays(fetch_shakespeare())
    full = method == "full"
    path = out / f"finetune_{data}{'_full' if full else ''}.jsonl"
    if not path.exists():
        tokenizer, rng = load_tokenizer(base), random.Random(1)
        docs = [
            p
            for f in train
            for p in pieces(f.read_text(encoding="utf-8"), size=PIECE_CHARS * (4 if full else 1))
        ]
        if data == "mix":  # the faithful base's pretraining mixture, freshly drawn
            docs = faithful_mixture(tokenizer, rng, docs, tokens=LT + 16 if full else LO + 2)
        # filled to at most `tokens`, short of it by up to a filler word: full needs
        elif data == "plays+episodes":
            # every episode >= Lt tokens
            docs += [
                passkey_episode(tokenizer, rng, tokens=LT + 16 if full else LO + 2)
                for _ in range(len(docs))
            ]
        write_jsonl(path, docs)
    held_dir = out / "held_out"
    held_dir.mkdir(exist_ok=True)
    for f in held:
        (held_dir / f.name).write_text(f.read_text(encoding="utf-8"))
    return path, held_dir


def evaluate(name, model, held_dir, out, args):
    lengths = ",".join(map(str, LENGTHS))
    run(
        "eval_ppl.py",
        "--model",
        model,
        "--data",
        held_dir,
        "--lengths",
        lengths,
        "--stride",
        LO // 2,
        "--docs",
        4,
        "--max_tokens",
        args.ppl_tokens,
        "--out",
        out / f"{name}_ppl.json",
    )
    run(
        "eval_passkey.py",
        "--model",
        model,
        "--lengths",
        lengths,
        "--trials",
        args.trials,
        "--depths",
        DEPTHS,
        "--seed",
        0,
        "--out",
        out / f"{name}_passkey.json",
        "--plot",
        out / f"{name}_passkey.png",
    )
    run(
        "eval_passkey.py",
        "--model",
        model,
        "--lengths",
        lengths,
        "--trials",
        args.trials,
        "--max_key_distance",
        LO - 64,
        "--seed",
        1,
        "--out",
        out / f"{name}_passkey_near.json",
    )


def summary(out, method="pose"):
    """-> {model: {"ppl": {L: ppl}, "passkey": {L: acc}, "near": {L: acc}, "by_depth": {(L, depth):
    acc}}} for the base ("none") and the fine-tuned model (named by its --method)."""
    table = {}
    for name in ("none", method):
        ppl, far, near = (
            json.loads((out / f"{name}_{kind}.json").read_text())["lengths"]
            for kind in ("ppl", "passkey", "passkey_near")
        )
        by_depth = {}
        for L, v in far.items():
            for t in v["trials"]:
                by_depth.setdefault((int(L), round(t["depth"], 2)), []).append(t["correct"])
        table[name] = {
            "ppl": {int(L): v["ppl"] for L, v in ppl.items()},
            "passkey": {int(L): v["accuracy"] for L, v in far.items()},
            "near": {int(L): v["accuracy"] for L, v in near.items()},
            "by_depth": {k: sum(v) / len(v) for k, v in by_depth.items()},
        }
    return table


DATA = {
    "plays+episodes": "training plays + passkey episodes in the evaluation's own template (a "
                      "trained task)",
    "plays": "training plays only",
    "mix": "the base's last pretraining mixture (training plays + retrieval episodes in other "
           "words; no sentence of the evaluation's prompt)",
}


def report(table, out, data):
    tuned = list(table)[1]
    lines = [
        f"{tuned} = the base fine-tuned on {DATA[data]}",
        "",
        "Table 1 in miniature: sliding-window perplexity (4 held-out plays, stride 128)",
        "model  " + "".join(f"{L:>9}" for L in LENGTHS),
    ]
    lines += [
        f"{name:<7}" + "".join(f"{table[name]['ppl'][L]:>9.2f}" for L in LENGTHS) for name in table
    ]
    lines += [
        "",
        "Figure 2b in miniature: passkey accuracy, key at depths " + DEPTHS,
        "model  " + "".join(f"{L:>9}" for L in LENGTHS),
    ]
    lines += [
        f"{name:<7}" + "".join(f"{table[name]['passkey'][L]:>9.0%}" for L in LENGTHS)
        for name in table
    ]
    lines += [
        "",
        f"passkey accuracy, key within the last {LO} tokens before the question",
        "model  " + "".join(f"{L:>9}" for L in LENGTHS),
    ]
    lines += [
        f"{name:<7}" + "".join(f"{table[name]['near'][L]:>9.0%}" for L in LENGTHS) for name in table
    ]
    text = "\n".join(lines)
    print("\n" + text)
    (out / "summary.txt").write_text(text + "\n")
    (out / "summary.json").write_text(
        json.dumps(
            {name: {k: v for k, v in t.items() if k != "by_depth"} for name, t in table.items()},
            indent=1,
        )
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for demo.png)")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in zip(table, ("o--", "o-")):
        a.plot(LENGTHS, [table[name]["ppl"][L] for L in LENGTHS], style, label=name)
        b.plot(
            LENGTHS,
            [100 * table[name]["passkey"][L] for L in LENGTHS],
            style,
            label=f"{name}, any depth",
        )
        b.plot(
            LENGTHS,
            [100 * table[name]["near"][L] for L in LENGTHS],
            style.replace("o", "s"),
            alpha=0.6,
            label=f"{name}, key in last {LO}",
        )
    for ax, title in ((a, "perplexity (sliding window)"), (b, "passkey accuracy %")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(LENGTHS, [str(L) for L in LENGTHS])
        ax.axvline(LO, color="grey", lw=0.5)
        ax.set_xlabel("window / prompt length (tokens)")
        ax.set_title(title)
        ax.legend()
    a.set_yscale("log")
    b.set_ylim(-5, 105)
    fig.suptitle(
        f"{tuned} {LO} -> {LT} on the tiny demo model, fine-tuned on {data} (none = no fine-tuning)"
    )
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=120)
    print(
        f"plots: {out / 'demo.png'}, "
        + ", ".join(str(out / f"{name}_passkey.png") for name in table)
    )


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument(
        "--steps",
        type=int,
        default=300,
        help="PoSE fine-tuning steps of 32 examples of Lc = 256 tokens",
    )
    p.add_argument(
        "--method",
        default="pose",
        choices=("pose", "randpos", "full", "noskip"),
        help="pose; randpos (Lc sorted random positions of 0..Lt-1); full (Lt tokens at 0..Lt-1, "
             "the upper bound PoSE approximates, 8x the tokens per example); noskip (Lc tokens at "
             "0..Lc-1, RoPE unscaled: the same-data baseline, which fine-tunes without extending)",
    )
    p.add_argument(
        "--data",
        default="mix",
        choices=("mix", "plays+episodes", "plays"),
        help="fine-tuning data: mix (the base's last pretraining mixture: the plays and retrieval "
        "episodes never in the evaluation's words); plays+episodes (the plays and as many passkey "
        "episodes in the evaluation's own template, so retrieval is trained on the evaluated "
        "prompt); plays (only)",
    )
    p.add_argument(
        "--scaling",
        default="yarn",
        help="RoPE scaling, s = Lt/Lo = 8: linear, ntk, yarn, or a scaling.json of longrope.py "
        "(LongRoPE's searched factors; train.py checks it)",
    )
    p.add_argument("--chunks", type=int, default=2, help="N, chunks per example")
    p.add_argument("--content", default="random", choices=("random", "contiguous", "aligned"))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--trials", type=int, default=20, help="passkey trials per length (and per test)"
    )
    p.add_argument(
        "--ppl_tokens", type=int, default=8192, help="tokens of each held-out play scored"
    )
    p.add_argument(
        "--base",
        type=Path,
        default=ROOT / "demo" / "base",
        help="the model to extend (Lo must be 256)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    args = p.parse_args(argv)
    if not (args.base / "config.json").is_file():
        sys.exit(f"error: {args.base} holds no model; build it with python demo/build_base.py.")
    from demo.build_base import check_settings

    weights = hashlib.sha256((args.base / "model.safetensors").read_bytes()).hexdigest()[:16]
    check_settings(
        args.out,
        {
            "base": weights,
            **{
                k: v
                for k, v in vars(args).items()
                if k not in ("base", "out", "trials", "ppl_tokens")
            },
        },
    )
    data, held_dir = fine_tuning_data(args.out, args.base, args.method, args.data)
    tuned_dir = args.out / args.method
    if not (tuned_dir / "final").exists():
        extend = [] if args.method == "noskip" else ["--target_len", LT, "--scaling", args.scaling]
        run(
            "train.py",
            "--model",
            args.base,
            "--data",
            data,
            "--method",
            args.method,
            "--train_len",
            LO,
            *extend,
            "--chunks",
            args.chunks,
            "--content",
            args.content,
            "--steps",
            args.steps,
            "--batch_size",
            32,
            "--micro_batch_size",
            8 if args.method == "full" else 32,
            "--lr",
            args.lr,
            "--warmup",
            10,
            "--save_every",
            50,
            "--save_dtype",
            "float32",
            "--out",
            tuned_dir,
            "--auto_resume",
        )
    evaluate("none", args.base, held_dir, args.out, args)
    evaluate(args.method, tuned_dir / "final", held_dir, args.out, args)
    report(summary(args.out, args.method), args.out, args.data)


if __name__ == "__main__":
    main()
