"""`reprise bench MODE`, one subcommand per mode, with shared parent parsers:

- in process (the engine flags of `reprise serve`): `decode` (throughput), `prefix` (cache TTFT:
  cold, exact, nearest, disk), `spec` (speculative decoding);
- against any OpenAI-compatible server (`--base-url`, `--api-key`): `serve` (the same questions
  over HTTP), `soak` (a mixed load with leak and tenant checks), `audit` (is the cache shared
  across API keys, audit.py);
- `compare`: `bench serve` results side by side.
Each prints a table and writes JSON with `--out`.
"""
from __future__ import annotations

import argparse

MODES = {
    "decode": "prefill and decode throughput at several batch sizes and contexts",
    "prefix": "TTFT cold vs exact-hot vs nearest-hot (vs disk-hot with --disk-cache-dir)",
    "spec": "decode with and without --speculative ngram, and its acceptance",
    "serve": "the prefix-cache scenarios against any OpenAI-compatible server",
    "compare": "bench serve results side by side (markdown table, chart)",
    "soak": "a mixed load (chat, tools, Messages, Responses, tenants, disconnects) with leak checks",
    "audit": "the timing audit: is a server's prefix cache shared across API keys?",
}


def add_bench_parser(commands, engine_flags) -> argparse.ArgumentParser:
    bench = commands.add_parser("bench", help="benchmarks: " + ", ".join(MODES),
                                description="One subcommand per benchmark; `reprise bench MODE --help` lists its flags.")
    modes = bench.add_subparsers(dest="what", metavar="MODE", required=True)
    engine = argparse.ArgumentParser(add_help=False)
    engine_flags(engine)
    output = _parent(lambda add: add("--out", default=None, help="write the results as JSON here"))
    plot = _parent(lambda add: add("--plot", default=None, help="write a PNG chart here"))
    repeats = _parent(lambda add: add("--repeats", type=int, default=3, help="runs per case (median reported)"))
    client = _parent(_client_flags)

    def mode(name: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return modes.add_parser(name, parents=list(parents), help=MODES[name], description=MODES[name])

    _decode_flags(mode("decode", engine, output).add_argument)
    prefix = mode("prefix", engine, output, plot, repeats).add_argument
    prefix("--lengths", default="2000,4000,8000", help="prompt lengths in tokens")
    prefix("--output-tokens", type=int, default=32, help="tokens generated per request")
    mode("spec", engine, output, repeats).add_argument(
        "--decode-tokens", type=int, default=128, help="tokens per answer at most")
    from reprise.bench.serve import add_serve_flags
    add_serve_flags(mode("serve", client, output, plot, repeats))
    compare = mode("compare", plot).add_argument
    compare("inputs", nargs="+", help="result files of bench serve")
    compare("--out", default=None, help="write the table as markdown here")
    _soak_flags(mode("soak", client, output).add_argument)
    from reprise.bench import audit
    audit.add_arguments(mode("audit", client, output))
    return bench


def _parent(add_flags) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    add_flags(parent.add_argument)
    return parent


def _client_flags(add) -> None:
    add("--base-url", default="http://127.0.0.1:8000", help="the server to measure")
    add("--api-key", default=None, help="sent as a Bearer token (default: env REPRISE_API_KEY or OPENAI_API_KEY)")
    add("--model", default=None, help="the model name to request (default: the first in /v1/models)")
    add("--request-timeout", type=float, default=600.0, help="seconds before a request is recorded as failed")
    add("--seed", type=int, default=0, help="seeds the prompts and the mix")


def _decode_flags(add) -> None:
    add("--prompt-tokens", type=int, default=2000, help="prefill prompt length")
    add("--batch-sizes", default="1,8", help="concurrent streams to measure (comma-separated)")
    add("--contexts", default="32", help="prompt lengths the streams decode after (comma-separated), e.g. 64,3000")
    add("--sampling", default="plain",
        help="sampling modes to measure, of plain, penalties, json, tools_auto (comma-separated)")
    add("--decode-tokens", type=int, default=128, help="tokens generated per stream")


def _soak_flags(add) -> None:
    add("--requests", type=int, default=300, help="requests to send")
    add("--concurrency", type=int, default=16, help="requests in flight")
    add("--admin-key", default=None, help="the server's admin key, for /v1/cache/check with several --api-key "
                                          "(comma-separated)")
    add("--reference-url", default=None, help="run the same plan here first (a fault-free server) and compare "
                                              "greedy outputs")


def run_bench(args: argparse.Namespace, llm_kwargs: dict) -> int:
    if args.what in ("serve", "soak", "audit", "compare"):
        return _run_client(args)
    from reprise.bench.report import environment, print_table, write_json
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


def _run_client(args: argparse.Namespace) -> int:
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
    from reprise.bench.compare import run_compare
    return run_compare(args.inputs, args.out, args.plot)
