"""The extension loads everywhere and reports what it was built with."""

import subprocess
import sys

import torch

import lutflash
from lutflash import _C


def test_import_without_torch_cuda_initialisation():
    # importing must not need a GPU, a driver or torch.cuda
    code = "import lutflash, torch; assert not torch.cuda.is_initialized(); print(lutflash.built_with_cuda)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() in ("True", "False")


def test_device_count_agrees_with_torch():
    if lutflash.built_with_cuda:
        assert _C.cuda_device_count() == torch.cuda.device_count()
    else:
        assert _C.cuda_device_count() == 0


def test_cpu_features_and_variant():
    features = _C.cpu_features()
    assert isinstance(features, dict)
    assert _C.lutgemm_cpu_variant() in ("portable", "avx2", "avx512")
