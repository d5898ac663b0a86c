"""The ``backend`` fixture of the CUDA kernel tests: ``cuda-emu`` (the kernel sources on the CPU, default
suite) and ``cuda`` (the real extension; marked gpu, skipped without a device)."""
import pytest
import torch

from mbt_fast import cuda_ext

_EMU = cuda_ext.build_problems(emulated=True)


@pytest.fixture(params=[
    pytest.param("cuda-emu", marks=pytest.mark.skipif(bool(_EMU), reason="; ".join(_EMU) or "ok")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]),
])
def backend(request):
    return request.param
