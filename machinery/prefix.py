"""Prompts that share their beginning share its KV cache: a sweep computes each prefix once.

    trials.sort(key=lambda t: t["tokens"])     # prompts with a common beginning side by side
    shared = SharedPrefix(model, device)
    answers = [shared.generate(t["tokens"], 8, eos_id=eos) for t in trials]

At one length every passkey trial (and every needle-in-a-haystack sample of RULER, Hsieh et al.
2024, arXiv 2404.06654, whose haystack is not drawn per sample) reads the same filler up to its
key. The KV cache of a causal model at position i depends on tokens 0..i only, so the cache that
one prompt left holds the keys and values of every token it shares with the next: rewinding the
cache's `length` to the longest common prefix and prefilling the rest gives the cache a fresh
prefill would give (up to the floating-point order of its sums). In lexicographic order of token
ids each prompt follows the one it shares most with, and every node of the prompts' prefix tree is
computed exactly once (depth-first order), which no other order of one cache does better.
"""
import torch


def common_prefix(a, b):
    """The number of leading ids two token lists share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class SharedPrefix:
    """One KV cache (batch 1) kept from prompt to prompt, and the token ids it holds."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.cache, self.tokens = None, []

    @torch.inference_mode()
    def generate(self, tokens, max_new_tokens, *, eos_id=None, prefill_chunk=None):
        """Greedy decoding of `tokens` (a list of ids), as model.generate does, from the cached
        prefix it shares with the previous prompt -> (max_new_tokens or fewer ids,) tensor."""
        size = len(tokens) + max_new_tokens
        if self.cache is None or self.cache[0].k.shape[1] < size:  # grown, the prefix kept
            bigger = self.model.make_cache(1, size)
            for new, old in zip(bigger, self.cache or []):
                n = old.k.shape[1]
                new.k[:, :n], new.v[:, :n] = old.k, old.v
            self.cache = bigger
        # the last prompt token is always fed: its final state gives the first new token
        keep = min(common_prefix(self.tokens, tokens), len(tokens) - 1)
        for layer in self.cache:
            layer.length = keep  # positions keep.. are overwritten by this prompt's remainder
        rest = torch.tensor([tokens[keep:]], device=self.device)
        h = self.model.prefill(rest, self.cache, prefill_chunk)
        self.tokens = tokens  # the ids decoded after them are never shared: keep <= len(tokens)
        out = []
        for _ in range(max_new_tokens):  # model.generate's loop on a cache it does not make
            next_token = self.model.logits(h).argmax(-1, keepdim=True)  # (1, 1)
            out.append(next_token)
            if eos_id is not None and next_token.item() == eos_id:
                break
            h = self.model(next_token, cache=self.cache, hidden_only=True)[:, -1]
        return torch.cat(out, dim=1)[0]
