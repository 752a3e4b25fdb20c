"""The CPU suite is CPU-only by construction: CUDA is hidden before torch is imported, here and (through the
environment) in every subprocess a test starts, so train.py and the eval scripts pick the CPU and fp32 and the
exact comparisons and 2-process torchrun runs behave as on the CI machine even on a GPU box.
tests/test_cuda.py is the separate GPU check: POSE_TEST_CUDA=1 python -m pytest tests/test_cuda.py.

Fixtures shared by the test files live here. Tests marked slow (pytest.ini) take minutes;
`python -m pytest -m "not slow"` is the edit-and-rerun loop, `make test` runs everything."""
import os

if os.environ.get("POSE_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: a second OpenMP thread only waits (and spins),
    up to 100x slower under load. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
