"""Open a GGUF file in llama.cpp (llama-cpp-python) the way bitsmith's checks and benchmarks need.

llama.cpp repacks weights into "extra" CPU buffer types where the CPU has them; its AMX buffer
(Sapphire Rapids and later Xeons) crashes the process at the first decode in the llama.cpp that
llama-cpp-python 0.3.36 builds (ggml-org/llama.cpp issue 20824), so extra buffer types are turned
off: the plain CPU kernels compute the same products.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def _no_extra_buffer_types() -> Iterator[None]:
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def open_gguf(path: str | Path, **kwargs: Any):
    """``llama_cpp.Llama(model_path=path, **kwargs)`` with llama.cpp's extra CPU buffer types off."""
    import llama_cpp

    with _no_extra_buffer_types():
        return llama_cpp.Llama(model_path=str(path), **kwargs)
