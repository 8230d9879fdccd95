import subprocess
import sys

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


_AOTI_PROBE = """
import sys, torch
model = torch.nn.Linear(8, 8).eval()
x = torch.randn(2, 8)
path = torch._inductor.aoti_compile_and_package(torch.export.export(model, (x,)), package_path=sys.argv[1])
assert torch.allclose(torch._inductor.aoti_load_package(path)(x), model(x), atol=1e-5)
"""


@pytest.fixture(scope="session")
def aoti_loads(tmp_path_factory):
    """Skip AOTInductor tests where no AOTInductor package can be loaded at all (checked on a plain
    nn.Linear in a subprocess). Seen on a GPU image whose g++ 13 is newer than the libstdc++ that
    torch 2.11's process loads: every package segfaults at load, which would kill the test session."""
    path = tmp_path_factory.mktemp("aoti_probe") / "probe.pt2"
    proc = subprocess.run([sys.executable, "-c", _AOTI_PROBE, str(path)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"AOTInductor cannot load even a plain nn.Linear package here (exit code {proc.returncode}); "
                    "for a segfault, preload the compiler's libstdc++: LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6). "
                    f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
