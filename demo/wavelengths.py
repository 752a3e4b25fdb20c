"""What a RoPE scaling does to each channel pair: the wavelength 2π/θ_j in tokens before and after
(rope.py), and their ratio: s where positions are squeezed (interpolated), 1 where left alone.

    python demo/wavelengths.py --scaling yarn:16 --original 2048 --head_dim 128
"""

import argparse
import math

import rope
from errors import exit_on_user_error
from machinery.evaluation import parse_scaling


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scaling",
        type=parse_scaling,
        default=None,
        help=f"TYPE:FACTOR with TYPE one of {', '.join(rope.SCALINGS)} (e.g. yarn:16), "
        "or a JSON dict with Hugging Face's keys",
    )
    p.add_argument(
        "--original",
        type=int,
        default=2048,
        help="Lo, the context the model was trained for (for dynamic, yarn, llama3)",
    )
    p.add_argument("--head_dim", type=int, default=128, help="d, channels per attention head")
    p.add_argument("--base", type=float, default=10000.0, help="RoPE's base (rope_theta)")
    args = p.parse_args(argv)
    scaling = args.scaling
    if rope.kind(scaling) == "llama3":  # Llama 3.1's frequency factors unless given
        scaling = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, **scaling}
    if scaling:
        scaling = {rope.LO: args.original, **scaling}
    plain, _ = rope.inv_freq(args.head_dim, args.base)
    scaled, attention = rope.inv_freq(args.head_dim, args.base, scaling)
    print(f"{scaling or 'plain RoPE'}: attention factor {attention:.4f}")
    print("  j   wavelength   scaled wavelength   ratio")
    rows = [
        (j, 2 * math.pi / t0, 2 * math.pi / t1)
        for j, (t0, t1) in enumerate(zip(plain.tolist(), scaled.tolist()))
    ]
    for j, w0, w1 in rows:
        print(f"{j:3d} {w0:12.1f} {w1:19.1f} {w1 / w0:7.3f}")
    return rows


if __name__ == "__main__":
    main()
