"""Defect 6: every form a real out-of-memory error takes is recognised, nothing else is.

The messages are worded as torch, CUDA, cuBLAS and cuDNN word them; the CPU forms are
provoked for real (an allocation the machine cannot give)."""

from __future__ import annotations

import pytest

from dropkiln.stages.device import is_out_of_memory


def _real_cpu_allocator_failure() -> BaseException:
    import torch

    try:
        torch.empty(2**50, dtype=torch.uint8)
    except RuntimeError as exc:
        return exc
    raise AssertionError("a petabyte was allocated")


def _real_python_memory_error() -> BaseException:
    try:
        bytearray(2**50)
    except MemoryError as exc:
        return exc
    raise AssertionError("a petabyte was allocated")


def _forms() -> list[tuple[str, BaseException]]:
    import torch

    return [
        (
            "torch",
            torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 23.65 GiB total capacity)"
            ),
        ),
        ("cuda-allocator", RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")),
        (
            "cuda-runtime",
            torch.AcceleratorError(
                "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"
            ),
        ),
        ("cuda-runtime-plain", RuntimeError("CUDA error: out of memory")),
        (
            "cublas",
            RuntimeError(
                "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
            ),
        ),
        (
            "cudnn-workspace",
            RuntimeError(
                "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed"
                " in a non-contiguous input."
            ),
        ),
        ("cudnn-alloc", RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")),
        ("cpu-allocator", _real_cpu_allocator_failure()),
        ("python", _real_python_memory_error()),
    ]


@pytest.mark.parametrize("index", range(9))
def test_defect6_every_real_oom_form_is_recognised(index: int) -> None:
    name, error = _forms()[index]
    assert is_out_of_memory(error), (name, type(error), str(error))


def test_defect6_an_oom_raised_from_is_recognised_through_its_cause() -> None:
    try:
        try:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED")
        except RuntimeError as inner:
            raise ValueError("decoding failed") from inner
    except ValueError as outer:
        assert is_out_of_memory(outer)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA error: device-side assert triggered"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
        RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
        ValueError("out of memory"),  # a word in a message is not an allocation failure
        OSError(28, "No space left on device"),
    ],
)
def test_other_errors_are_not_out_of_memory(error: BaseException) -> None:
    assert not is_out_of_memory(error)


def test_an_error_raised_while_handling_an_oom_is_not_one() -> None:
    try:
        try:
            raise MemoryError()
        except MemoryError:
            raise KeyError("cleanup failed") from None
    except KeyError as error:
        assert not is_out_of_memory(error)
