import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Kernel tests run the Triton kernels on CPU tensors through the interpreter, unless a GPU run
# asks for compiled kernels (IBNORM_GPU_TESTS=1, see tests/test_kernels.py).
if os.environ.get("IBNORM_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
