"""The CPU suite is CPU-only by construction: CUDA is hidden before torch is imported, here and
(through the environment) in every subprocess a test starts, so train.py and the eval scripts pick
the CPU and fp32 and the exact comparisons and 2-process torchrun runs behave as on the CI machine
even on a GPU box. tests/test_cuda.py is the separate GPU check: POSE_TEST_CUDA=1 python -m pytest
tests/test_cuda.py.

Fixtures and helpers shared by the test files live here (`from conftest import byte_tokenizer`).
Tests marked slow (pyproject.toml) take minutes; `python -m pytest -m "not slow"` is the
edit-and-rerun loop, `make test` runs everything."""

import os
import random

if os.environ.get("POSE_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

from model import ModelArgs, Transformer  # noqa: E402
from machinery.tokenizer import GPT2_PATTERN, Tokenizer  # noqa: E402

WORDS = (
    "the grass is green the sky is blue the sun is yellow here we go there and back again".split()
)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: a second OpenMP thread only waits (and spins),
    up to 100x slower under load. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def byte_tokenizer(add_bos=False):
    """256 byte tokens and BOS/EOS, no merges: a real byte-level BPE, small enough for tiny models,
    in which every character of ASCII text is one token."""
    return Tokenizer(
        {bytes([i]): i for i in range(256)},
        {"<s>": 256, "</s>": 257},
        GPT2_PATTERN,
        bos_id=256,
        eos_id=257,
        add_bos=add_bos,
    )


def save_tiny_model(directory, seed=0, add_bos=False, **overrides):
    """A random 2-layer LLaMA with Lo = 32 (ModelArgs `overrides` change it) and the byte tokenizer,
    saved as a Hugging Face directory; -> the model."""
    torch.manual_seed(seed)
    args = dict(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, hidden_dim=64, max_seq_len=32
    )
    model = Transformer(ModelArgs(**{**args, **overrides}))
    model.save_pretrained(directory, tokenizer=byte_tokenizer(add_bos))
    return model


def write_documents(directory, n=6):
    """n text documents of 12, 42, 72 ... words from WORDS (60-800 bytes), the same on every run."""
    rng = random.Random(0)
    directory.mkdir()
    for i in range(n):
        (directory / f"doc{i}.txt").write_text(
            " ".join(rng.choice(WORDS) for _ in range(12 + 30 * i))
        )
    return directory
