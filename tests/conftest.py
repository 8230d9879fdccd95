import pytest
import torch


def _cuda_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    import liteattn_ops

    if not liteattn_ops.is_available():
        return False, "liteattn_ops._C (the CUDA kernel) is not built"
    if torch.cuda.get_device_capability() != (9, 0):
        return False, "the kernel needs a Hopper GPU (sm_90)"
    return True, ""


def pytest_collection_modifyitems(config, items):
    ready, why = _cuda_ready()
    if ready:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
