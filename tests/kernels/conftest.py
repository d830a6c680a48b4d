"""Kernel tests: on a machine without CUDA, Triton kernels run in the interpreter (the test
root's conftest sets ``TRITON_INTERPRET`` and patches the interpreter for numpy >= 2.4)."""
