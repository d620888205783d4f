"""Where the Triton kernels run: the ``triton`` module (None where it is not installed), whether the CPU
interpreter is on (``TRITON_INTERPRET=1``, set before triton is imported), whether kernels can take a tensor
or device here, and the multiprocessor count that sizes persistent grids."""
from __future__ import annotations

import os

import torch

from ..fallbacks import warn_fallback

try:
    import triton

    TRITON_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - triton ships with CUDA torch; CPU machines use the references
    triton = None
    TRITON_IMPORT_ERROR = str(e)


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(where) -> bool:
    """Whether the Triton kernels can run on ``where`` (a tensor or a device): CUDA, or the CPU under the interpreter."""
    device = torch.device(getattr(where, "device", where))
    return triton is not None and (device.type == "cuda" or (interpreting() and device.type == "cpu"))


def auto_triton(x: torch.Tensor, what: str) -> bool:
    """The 'auto' backend choice for ``x``: whether the Triton kernels of ``what`` run. Warns once where ``x`` is
    on a GPU but Triton cannot be imported (the PyTorch reference then runs there, several times slower)."""
    if triton_usable(x):
        return True
    if x.device.type == "cuda":
        warn_fallback("triton", f"{what}: Triton cannot be imported ({TRITON_IMPORT_ERROR}), so the PyTorch "
                                f"reference runs on the GPU (several times slower, more memory); install the "
                                f"triton that matches your torch (pip install triton)")
    return False


def sm_count(device: torch.device, cpu: int = 1) -> int:
    """Streaming multiprocessors of a CUDA ``device``; ``cpu`` stands in for them elsewhere (the interpreter)."""
    if device.type != "cuda":
        return cpu
    return torch.cuda.get_device_properties(device).multi_processor_count
