"""Which errors mean "out of memory": the memory ladder's one entry test.

torch raises its own ``OutOfMemoryError`` only for the CUDA caching allocator. Every other
allocation failure surfaces as a plain ``RuntimeError`` (or ``torch.AcceleratorError``, a
subclass) whose message names the library that could not allocate, or as Python's own
``MemoryError``. Each rule below is one such form; an error (or an error it was raised from)
that matches any rule is retried one rung down, anything else fails the job. Only the
explicit cause (``raise … from oom``) is followed, not an error raised while handling one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OomRule:
    name: str
    exception: str
    """Name of a class in the error's MRO (names, so torch need not be imported)."""
    message: str | None = None
    """A substring the message must contain; None: the class alone decides."""


OOM_RULES: tuple[OomRule, ...] = (
    # The CUDA caching allocator could not find a block: "CUDA out of memory. Tried to
    # allocate 20.00 MiB (GPU 0; …)".
    OomRule("torch", "OutOfMemoryError"),
    # The same message from code that re-raises it as a RuntimeError (torch < 2.1, and
    # libraries that wrap it, e.g. diffusers' pipelines in some paths).
    OomRule("cuda-allocator", "RuntimeError", "CUDA out of memory"),
    # cudaMalloc failing outside the caching allocator (a kernel's workspace, a CUDA
    # context): cudaErrorMemoryAllocation, printed as "CUDA error: out of memory".
    OomRule("cuda-runtime", "RuntimeError", "CUDA error: out of memory"),
    # cuBLAS could not allocate its handle or workspace: "CUDA error:
    # CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`".
    OomRule("cublas", "RuntimeError", "CUBLAS_STATUS_ALLOC_FAILED"),
    # cuDNN could not allocate: "cuDNN error: CUDNN_STATUS_ALLOC_FAILED".
    OomRule("cudnn-alloc", "RuntimeError", "CUDNN_STATUS_ALLOC_FAILED"),
    # cuDNN reports a convolution whose workspace it could not allocate as NOT_SUPPORTED
    # ("… This error may appear if you passed in a non-contiguous input."). dropkiln's
    # inputs are contiguous, and a smaller batch or tiling is the known cure; an input
    # that really is unsupported fails at the bottom rung with every rung named.
    OomRule("cudnn-workspace", "RuntimeError", "CUDNN_STATUS_NOT_SUPPORTED"),
    # ROCm builds say HIP where CUDA builds say CUDA.
    OomRule("hip-allocator", "RuntimeError", "HIP out of memory"),
    # torch's CPU allocator (CPU offload rungs, the CPU device): "DefaultCPUAllocator:
    # can't allocate memory: you tried to allocate N bytes" (newer: "not enough memory").
    OomRule("cpu-allocator", "RuntimeError", "DefaultCPUAllocator"),
    # Python's own allocator (numpy, PIL, a bytearray).
    OomRule("python", "MemoryError"),
)


def oom_rule(exc: BaseException) -> OomRule | None:
    """The rule an error (or the error it was raised from) matches, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names = {cls.__name__ for cls in type(current).__mro__}
        message = str(current)
        for rule in OOM_RULES:
            if rule.exception in names and (rule.message is None or rule.message in message):
                return rule
        current = current.__cause__
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    return oom_rule(exc) is not None
