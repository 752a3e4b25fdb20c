"""Does a base model copy from its context? The two numbers behind docs/RESULTS.md's table of demo
bases.

    python demo/probe_base.py demo/base         # a saved model
    python demo/probe_base.py data/demo-faithful/stage2/checkpoint.pt \\
        data/demo-faithful/config.json          # a checkpoint and its config

answer loss: mean NLL of the 5 answer digits of 40 passkey episodes (eval_passkey's prompt, <= 250
tokens) with the key stated earlier in the episode; ln 10 = 2.303 is a uniform guess over the
digits. copy gain: NLL of the first copy minus the second copy of a run of 20 random words written
twice; > 0 only if the model looks back and copies (an induction head).
"""

import argparse
import json
import math
import random
from pathlib import Path

import torch

from errors import exit_on_user_error
from eval_passkey import build_prompt
from machinery.tokenizer import load_tokenizer
from model import ModelArgs, Transformer


def nll(model, ids):
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    return [-log_probs[t - 1, ids[t]].item() for t in range(1, len(ids))]  # nll[t-1]: of token t


@exit_on_user_error
def main(argv=None):
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a saved model directory, or a training run's checkpoint.pt")
    p.add_argument("config", nargs="?", help="the model's config.json (with a checkpoint.pt)")
    p.add_argument("tokenizer", nargs="?", default="demo/base",
                   help="the tokenizer of a checkpoint.pt (default: demo/base)")
    a = p.parse_args(argv)
    path, config, tokenizer = a.path, a.config, a.tokenizer
    if path.endswith(".pt") and config is None:
        p.error(f"{path} is a checkpoint: give its model's config.json after it")
    if path.endswith(".pt"):
        model = Transformer(ModelArgs(**json.loads(Path(config).read_text())))
        model.load_state_dict(torch.load(path, weights_only=True)["model"])
    else:
        model, tokenizer = Transformer.from_pretrained(path), path
    model.eval()
    tok = load_tokenizer(tokenizer)
    rng, answer = random.Random(5), []
    while len(answer) < 200:
        key, fill = rng.randint(10000, 99999), rng.randint(0, 6)
        before = rng.randint(0, fill)
        ids = tok.encode(build_prompt(key, before, fill - before) + f" {key}.")
        if len(ids) <= 250:
            answer += nll(model, ids)[-6:-1]  # the 5 digits before the final "."
    words = ("king crown sword night moon love death blood honour heaven ghost queen lord father "
             "daughter poison").split()
    rng, first, second = random.Random(9), [], []
    for _ in range(10):
        run = tok.encode(" ".join(rng.choice(words) for _ in range(20)) + "\n")
        losses = nll(model, run + run)
        first += losses[: len(run) - 1]
        second += losses[len(run) :]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(
        f"{path}: answer loss {mean(answer):.3f} (ln 10 = {math.log(10):.3f}), copy gain "
        f"{mean(first) - mean(second):.2f} (first copy {mean(first):.2f}, second "
        f"{mean(second):.2f})"
    )


if __name__ == "__main__":
    main()
