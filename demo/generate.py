"""Greedy generation from any checkpoint machinery.checkpoint.load reads: a first look at a model
before training.

python demo/generate.py --model smollm2 --prompt "The capital of France is"
python demo/generate.py --model out/pose/final --rope_scaling '{"rope_type": "yarn", "factor": 4}'
"""

import argparse
import json

import torch

from errors import exit_on_user_error
from machinery.checkpoint import load


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", required=True, help="Meta dir, Hugging Face dir, .gguf file, or smollm2"
    )
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max_new_tokens", type=int, default=30)
    p.add_argument(
        "--rope_scaling",
        type=json.loads,
        default=None,
        help='e.g. \'{"rope_type": "yarn", "factor": 4}\'',
    )
    args = p.parse_args(argv)
    model, tokenizer = load(args.model, rope_scaling=args.rope_scaling)
    prompt = torch.tensor([tokenizer.encode(args.prompt)])
    new = model.generate(prompt, args.max_new_tokens, eos_id=tokenizer.eos_id)[0]
    print(args.prompt + tokenizer.decode(new.tolist()))


if __name__ == "__main__":
    main()
