import os

import pytest
import torch

from lutflash.testing import poisoned_empty


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def cuda_device():
    """The device GPU tests put their tensors on: $LUTFLASH_TEST_DEVICE, default "cuda" (the
    current device). scripts/multi_gpu_check.sh sets it to cuda:1 on a two-GPU machine and leaves
    cuda:0 current, so the ops must make the tensors' device current and use that device's
    current stream; every GPU test should take its device from this fixture rather than
    hard-code "cuda". With any other device than cuda:0 named, the fixture checks that cuda:0 is
    current before the test and still current after it (the ops restore the caller's device)."""
    device = torch.device(os.environ.get("LUTFLASH_TEST_DEVICE", "cuda"))
    if device.type != "cuda":
        pytest.fail(f"LUTFLASH_TEST_DEVICE={device}: expected a CUDA device such as cuda:1")
    if device.index is not None and device.index >= torch.cuda.device_count():
        pytest.fail(f"LUTFLASH_TEST_DEVICE={device}: this machine has {torch.cuda.device_count()} "
                    "GPU(s)")
    other = device.index not in (None, 0)
    if other:
        assert torch.cuda.current_device() == 0, (
            f"cuda:0 must be current while the tensors are on {device}, got "
            f"cuda:{torch.cuda.current_device()}")
    yield device
    if other:
        assert torch.cuda.current_device() == 0, (
            f"the test left cuda:{torch.cuda.current_device()} current; cuda:0 was")


@pytest.fixture
def poison(monkeypatch):
    """torch.empty returns NaN-filled float tensors for the test (lutflash.testing)."""
    poisoned_empty(monkeypatch)
