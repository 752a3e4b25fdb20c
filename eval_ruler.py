"""RULER (Hsieh et al. 2024, arXiv 2404.06654), the check beyond passkey: needles in a haystack
with one or many keys, values and questions, and variable tracking, scored by task and length.

    python eval_ruler.py --model smollm2 --lengths 4096,8192 --samples 10 \\
        --tasks niah_single_1,niah_multikey_1,vt --out runs/ruler.json --plot runs/ruler.png
    python eval_ruler.py --model smollm2 --rope_scaling yarn:2 --lengths 16384 --samples 10 \\
        --out runs/ruler_yarn2.json
    torchrun --nproc_per_node 2 eval_ruler.py ...  # samples split across ranks, gathered on rank 0

The tasks, templates, needles, keys, values, depths and scoring are RULER's (machinery/ruler.py,
which says where we differ): each prompt is the largest that fits the length with its tokens to
generate (128 for the needles, 30 for vt), counted in the model's own tokens. A sample scores the
fraction of its references found in its answer (RULER's string_match_all), a task the mean × 100,
a length the mean over its tasks. Greedy decoding with the KV cache, as eval_passkey's; the
samples of one length run in token order, so that those reading the same haystack share the KV
cache of its beginning (machinery/prefix.py). Beyond the model's window a length is evaluated
with a warning (that is what extension methods are measured on). Results: --out (every sample's
settings, references and answer), a markdown table beside it (.md) and --plot (tasks × lengths).
The model flags, resumable results file and ranks are evaluation.py's, as eval_passkey.py's.
"""
import argparse

from errors import UserError, did_you_mean, exit_on_user_error
from machinery.evaluation import Session, add_common_args, pyplot, run, save
from machinery.files import atomic_write
from machinery.prefix import SharedPrefix
from machinery.ruler import CHAT, TASKS, Prompts, postprocess, string_match_all

PREFILL_CHUNK = 4096  # prompt tokens per prefill piece (Transformer.prefill), as eval_passkey's


def parse_tasks(text):
    tasks = [t for t in text.split(",") if t]
    for task in tasks:
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}{did_you_mean(task, TASKS)}; RULER's tasks "
                            f"here are {', '.join(TASKS)}.")
    if not tasks:
        raise UserError("--tasks names no task; give some of " + ", ".join(TASKS) + ".")
    return tasks


def run_sample(model, tokenizer, sample, device, shared=None, prefill_chunk=PREFILL_CHUNK):
    """One sample's greedy answer and score; from the prefix `shared` (a SharedPrefix) holds."""
    shared = shared or SharedPrefix(model, device)
    generated = shared.generate(sample["tokens"], sample["generate"], eos_id=tokenizer.eos_id,
                                prefill_chunk=prefill_chunk)
    answer = tokenizer.decode(generated.tolist())
    score = string_match_all([postprocess(answer)], [sample["references"]]) / 100
    kept = {k: v for k, v in sample.items() if k not in ("prompt", "tokens")}
    return kept | {"answer": answer, "score": score}


def task_scores(records, tasks):
    """{task: RULER's string_match_all over its samples' answers}."""
    scores = {}
    for task in tasks:
        mine = [r for r in records if r["task"] == task]
        scores[task] = string_match_all([postprocess(r["answer"]) for r in mine],
                                        [r["references"] for r in mine])
    return scores


def table(results, tasks, lengths):
    """The scores as a markdown table: a row per task, a column per length, and their mean."""
    rows = [f"| task | {' | '.join(str(n) for n in lengths)} |",
            "|---|" + "---:|" * len(lengths)]
    for task in tasks:
        scores = [results[str(n)]["tasks"][task] for n in lengths]
        rows.append(f"| {task} | {' | '.join(f'{s:.1f}' for s in scores)} |")
    means = [results[str(n)]["score"] for n in lengths]
    rows.append(f"| **mean** | {' | '.join(f'**{s:.1f}**' for s in means)} |")
    return "\n".join(rows) + "\n"


def plot(results, tasks, lengths, path):
    """A tasks × lengths map of the scores (0–100), each cell labelled."""
    plt = pyplot()
    if plt is None:
        return
    grid = [[results[str(n)]["tasks"][task] for n in lengths] for task in tasks]
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(lengths), 1 + 0.45 * len(tasks)))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    for r, row in enumerate(grid):
        for c, score in enumerate(row):
            ax.text(c, r, f"{score:.0f}", ha="center", va="center")
    ax.set(xticks=range(len(lengths)), xticklabels=lengths, yticks=range(len(tasks)),
           yticklabels=tasks, xlabel="prompt length (tokens)")
    fig.colorbar(image, ax=ax, label="RULER score (string_match_all)")
    save(fig, path)


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(
        description="RULER's synthetic tasks (needles, variable tracking): score per length.")
    add_common_args(p)
    p.add_argument("--tasks", default=",".join(TASKS),
                   help=f"comma-separated, of {', '.join(TASKS)} (default: all)")
    p.add_argument("--samples", type=int, default=10,
                   help="samples per task and length (RULER's default: 500)")
    p.add_argument("--seed", type=int, default=0,
                   help="keys, values and depths are drawn from (seed, task, length, sample)")
    p.add_argument("--template", default="base", choices=list(CHAT),
                   help="RULER's model template around the task's: base (none) or a chat one")
    args = p.parse_args(argv)
    args.tasks = parse_tasks(args.tasks)
    if args.samples < 1:
        raise UserError(f"--samples {args.samples}: give at least 1 sample per task and length.")
    config = {"script": "eval_ruler", **{k: getattr(args, k) for k in (
        "model", "rope_scaling", "context_len", "dtype", "tasks", "samples", "seed", "template")}}
    session = Session(args, config)
    prompts = Prompts(session.tokenizer, args.template, args.seed)
    window = session.model.args.window
    for length in args.lengths:  # a length that cannot hold a template fails before any work
        for task in args.tasks:
            prompts.sample(task, length, 0)
        if length > window and session.rank == 0:
            print(f"warning: length {length} is past the model's window of {window} tokens "
                  "(its RoPE and training): evaluated all the same.")
    for length in session.todo():
        mine = sorted((prompts.sample(task, length, i) for task in args.tasks
                       for i in range(session.rank, args.samples, session.world)),
                      key=lambda s: s["tokens"])  # neighbours share the most of their haystacks
        shared = SharedPrefix(session.model, session.device)
        records = [run_sample(session.model, session.tokenizer, s, session.device, shared)
                   for s in session.progress(f"ruler {length}", iterable=mine)]
        records = sorted(session.gather(records),
                         key=lambda r: (args.tasks.index(r["task"]), r["index"]))
        scores = task_scores(records, args.tasks)
        session.finish(length, {"score": round(sum(scores.values()) / len(scores), 2),
                                "tasks": scores, "samples": records})
    if session.rank == 0:
        results = session.lengths()
        text = table(results, args.tasks, args.lengths)
        print(f"\nRULER, {args.model}, {session.rope()}, {args.dtype}, {args.samples} samples, "
              f"template {args.template}\n\n{text}")
        atomic_write(session.out.with_suffix(".md"), text)
        if args.plot:
            plot(results, args.tasks, args.lengths, args.plot)
    return session.results


if __name__ == "__main__":
    run(main)
