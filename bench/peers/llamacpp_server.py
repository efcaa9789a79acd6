"""Start llama-cpp-python's OpenAI server with llama.cpp's extra buffer types off.

    PYTHON bench/peers/llamacpp_server.py --model GGUF_FILE --port 8002 --interrupt_requests False ...

This CPU advertises AMX but faults on AMX instructions, and llama.cpp's extra (repacking)
buffer types use them. Every model llama-cpp-python opens starts from
`llama_model_default_params()`, so wrapping that function is enough. Other flags go to
`llama_cpp.server` unchanged.
"""
from __future__ import annotations

import runpy

import llama_cpp

_default_params = llama_cpp.llama_model_default_params


def _params_without_extra_buffers():
    params = _default_params()
    params.use_extra_bufts = False
    return params


llama_cpp.llama_model_default_params = _params_without_extra_buffers
llama_cpp.llama_cpp.llama_model_default_params = _params_without_extra_buffers

if __name__ == "__main__":
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
