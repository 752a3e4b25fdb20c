"""What longrope.py writes besides its factors: the search's state file, resumed or refused, and
its figure (the best perplexity per generation; the factors against PI, NTK and YaRN)."""
import json

from errors import UserError
from machinery.evaluation import pyplot
from machinery.files import atomic_path


def resume(path, overwrite, fresh):
    """The state stored at `path` when its settings are `fresh`'s, else `fresh` (with
    --overwrite, or no file yet); a file of other settings is refused."""
    if not path.exists() or overwrite:
        path.parent.mkdir(parents=True, exist_ok=True)
        return fresh
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable search state ({e}); pass --overwrite to start "
                        "afresh.") from None
    if not isinstance(state, dict) or state.get("settings") != fresh["settings"]:
        raise UserError(f"{path} holds a search with other settings; pass --overwrite to start "
                        "afresh or choose another --out.")
    return state


def plot(state, seed_factors, path):
    """search.png: the best perplexity per generation beside the seeds', and the factors."""
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(range(len(state["best"])), state["best"], "o-", color="k", label="best so far")
    scores = {c["origin"]: c["ppl"] for c in state["candidates"] if c["origin"] in seed_factors}
    for (name, ppl), color in zip(scores.items(), ("C0", "C1", "C2")):
        a.axhline(ppl, ls="--", color=color, label=f"{name} ({ppl:.2f})")
    top = max(state["best"][0], min(scores.values()))  # seeds far above the curve: in the legend
    a.set(xlabel="generation (0: the first population)", ylabel=f"perplexity at {state['Lt']}",
          ylim=(0.99 * state["best"][-1], 1.02 * top), title="LongRoPE search")
    a.xaxis.get_major_locator().set_params(integer=True)
    for (name, factors), color in zip(seed_factors.items(), ("C0", "C1", "C2")):
        b.plot(factors, "--", color=color, label=name)
    best = min(state["candidates"], key=lambda c: c["ppl"])
    b.plot(best["factors"], "o-", color="k", label="searched")
    b.set(xlabel="channel pair j (fast -> slow)", ylabel="λ_j = θ_j / θ'_j",
          title=f"factors, s = {state['Lt'] / state['Lo']:g}")
    for ax in (a, b):
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
