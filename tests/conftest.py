"""The CPU suite is CPU-only by construction: CUDA is hidden before torch is imported, here and (through the
environment) in every subprocess a test starts, so train.py and the eval scripts pick the CPU and fp32 and the
exact comparisons and 2-process torchrun runs behave as on the CI machine even on a GPU box.
tests/test_cuda.py is the separate GPU check: POSE_TEST_CUDA=1 python -m pytest tests/test_cuda.py."""
import os

if os.environ.get("POSE_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
