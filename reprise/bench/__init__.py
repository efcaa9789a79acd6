"""`reprise bench decode|prefix|spec`: in-process benchmarks that print a table and write JSON;
`reprise bench serve`: the same questions asked over HTTP of any OpenAI-compatible server;
`reprise bench compare`: serve results side by side; `reprise bench audit`: is a server's cache
shared across API keys (audit.py)."""
from __future__ import annotations

import argparse


def add_bench_parser(commands, engine_flags) -> argparse.ArgumentParser:
    bench = commands.add_parser("bench", help="benchmarks: decode (throughput), prefix (cache TTFT), "
                                   "spec (speculative decoding), serve (any OpenAI-compatible server), "
                                   "compare (serve results), soak (a mixed load), audit (cache shared across keys?)")
    bench.add_argument("what", choices=["decode", "prefix", "spec", "serve", "compare", "soak", "audit"])
    engine_flags(bench)
    bench.add_argument("--prompt-tokens", type=int, default=2000, help="decode: prefill prompt length")
    bench.add_argument("--batch-sizes", default="1,8", help="decode: concurrent streams to measure")
    bench.add_argument("--contexts", default="32",
                       help="decode: prompt lengths the streams decode after (comma-separated), e.g. 64,3000")
    bench.add_argument("--sampling", default="plain",
                       help="decode: sampling modes to measure, of plain, penalties, json, tools_auto (comma-separated)")
    bench.add_argument("--decode-tokens", type=int, default=128,
                       help="decode: tokens generated per stream; spec: per answer at most")
    bench.add_argument("--lengths", default="2000,4000,8000", help="prefix: prompt lengths in tokens")
    bench.add_argument("--output-tokens", type=int, default=32, help="prefix: tokens generated per request")
    bench.add_argument("--repeats", type=int, default=3,
                       help="prefix, spec, serve repeat/nearest: runs per case (median reported)")
    bench.add_argument("--out", default=None, help="write the results as JSON here (compare: markdown)")
    bench.add_argument("--plot", default=None, help="prefix, serve, compare: write a PNG chart here")
    bench.add_argument("inputs", nargs="*", help="compare: result files of bench serve")
    from reprise.bench.serve import add_serve_flags
    add_serve_flags(bench)
    bench.add_argument("--requests", type=int, default=300,
                       help="soak: requests to send (also uses --base-url, --api-key, --concurrency, "
                            "--request-timeout, --seed, --out)")
    bench.add_argument("--admin-key", default=None,
                       help="soak: the server's admin key, for /v1/cache/check with several --api-key (comma-separated)")
    bench.add_argument("--reference-url", default=None,
                       help="soak: run the same plan here first (a fault-free server) and compare greedy outputs")
    from reprise.bench import audit
    audit.add_arguments(bench)
    return bench


def run_bench(args: argparse.Namespace, llm_kwargs: dict) -> int:
    from reprise.bench.report import environment, print_table, write_json
    if args.what == "serve":
        from reprise.bench.serve import run_serve
        run_serve(args)
        return 0
    if args.what == "audit":
        from reprise.bench.audit import run
        return run(args)
    if args.what == "soak":
        from reprise.bench.soak import run_soak_command
        return run_soak_command(args)
    if args.what == "compare":
        from reprise.bench.compare import run_compare
        return run_compare(args.inputs, args.out, args.plot)
    if args.what == "decode":
        from reprise.bench.decode import run_decode
        result = run_decode(llm_kwargs, args.prompt_tokens, [int(b) for b in args.batch_sizes.split(",")],
                            args.decode_tokens, args.sampling.split(","),
                            [int(c) for c in args.contexts.split(",")])
    elif args.what == "spec":
        from reprise.bench.spec import run_spec
        result = run_spec(llm_kwargs, args.decode_tokens, args.repeats)
    else:
        from reprise.bench.prefix import plot_prefix, run_prefix
        result = run_prefix(llm_kwargs, [int(n) for n in args.lengths.split(",")], args.output_tokens, args.repeats)
        if args.plot:
            plot_prefix(result, args.plot)
    result["environment"] = environment(llm_kwargs)
    print_table(result["rows"])
    if args.out:
        write_json(result, args.out)
    return 0
