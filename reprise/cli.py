"""reprise serve | generate | chat | bench  (argparse -> EngineConfig)."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from reprise.config import EngineConfig, parse_bytes
from reprise.engine.speculative import SPECULATIVE_METHODS


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="compute dtype (default: bfloat16 where the CPU has native bf16 matmul, else float32)")
    parser.add_argument("--weights", default=None, choices=["native", "bfloat16", "float32"],
                        help="native keeps GGUF weights quantized (Q4_0/1, Q5_0/1, Q8_0, Q2_K-Q6_K; other types "
                             "are dequantized); bfloat16/float32 dequantize every weight at load "
                             "(default: native for GGUF on CPU in bfloat16)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--kv-cache-bytes", type=parse_bytes, default=None,
                        help="KV pool budget, e.g. 512MiB or 4GiB (default: 20%% of available memory, at most 4GiB)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--no-prefix-cache", action="store_true", help="never reuse cached prefixes (for A/B runs)")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="running requests at most")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length cap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="decode through one torch.compile graph, built at start-up and cached in "
                             "~/.cache/reprise/inductor or $TORCHINDUCTOR_CACHE_DIR (docs/compile.md; "
                             "default: on for serve, off otherwise)")
    parser.add_argument("--checkpoint-interval", type=int, default=1024,
                        help="hybrid models: tokens between recurrent-state checkpoints in the prefix cache")
    parser.add_argument("--max-pinned-fraction", type=float, default=0.5,
                        help="of the KV pool, the blocks one tenant may pin (cache_control ttl, prompt_cache_retention)")
    parser.add_argument("--disk-cache-dir", default=None,
                        help="a disk tier under the KV pool in this directory, kept across restarts (docs/disk-cache.md)")
    parser.add_argument("--disk-cache-bytes", type=parse_bytes, default=None,
                        help="the disk tier's budget, LRU beyond it, e.g. 50GiB (default: 10GiB)")
    parser.add_argument("--kv-store", default=None, metavar="redis://HOST:PORT/DB",
                        help="a KV tier shared by replicas of the same model on Redis, which also carries the KV events "
                             "`reprise route` reads (docs/scale-out.md)")
    parser.add_argument("--kv-store-ttl", type=int, default=24 * 3600, metavar="SECONDS",
                        help="how long a block stays in the shared tier (Redis's allkeys-lru may drop it sooner)")
    parser.add_argument("--inject-fault-every", type=int, default=None, help=argparse.SUPPRESS)   # tests only
    parser.add_argument("--speculative", default=None, choices=SPECULATIVE_METHODS,
                        help="speculative decoding: ngram drafts tokens by prompt lookup (off by default)")
    parser.add_argument("--spec-tokens", type=int, default=4, help="speculative: draft tokens per step at most")
    parser.add_argument("--spec-ngram-max", type=int, default=3, help="speculative: longest n-gram looked up")
    parser.add_argument("--spec-ngram-min", type=int, default=1, help="speculative: shortest n-gram looked up")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, dtype=args.dtype, weights=args.weights, device=args.device,
                        kv_cache_bytes=args.kv_cache_bytes,
                        block_size=args.block_size, prefix_cache=not args.no_prefix_cache,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        max_model_len=args.max_model_len, seed=args.seed, compile=args.compile,
                        checkpoint_interval=args.checkpoint_interval, speculative=args.speculative,
                        spec_tokens=args.spec_tokens, spec_ngram_max=args.spec_ngram_max,
                        spec_ngram_min=args.spec_ngram_min, max_pinned_fraction=args.max_pinned_fraction,
                        disk_cache_dir=args.disk_cache_dir, disk_cache_bytes=args.disk_cache_bytes,
                        kv_store=args.kv_store, kv_store_ttl=args.kv_store_ttl,
                        inject_fault_every=args.inject_fault_every)


def _serve(args: argparse.Namespace) -> int:
    if args.model_path is not None:
        if args.model is not None and args.model != args.model_path:
            raise ValueError(f"two models given: {args.model_path} and --model {args.model}")
        args.model = args.model_path
    from reprise.server.config import server_config
    from reprise.server.serve import serve
    serve(engine_config(args), server_config(args))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from reprise import LLM, SamplingParams
    llm = LLM(**_llm_kwargs(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sampling_seed)
    output = llm.chat([{"role": "user", "content": args.prompt}], params) if args.chat_template \
        else llm.generate(args.prompt, params)[0]
    print(output.text)
    print(f"[{len(output.prompt_token_ids)} prompt tokens, {output.cached_tokens} cached, "
          f"{len(output.token_ids)} generated, finish: {output.finish_reason.value}]", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from reprise.chat_repl import run_chat
    return run_chat(_llm_kwargs(args), args.system, args.temperature, args.max_tokens)


def _llm_kwargs(args: argparse.Namespace) -> dict:
    """LLM(**kwargs) takes EngineConfig's fields by name."""
    return dataclasses.asdict(engine_config(args))


IN_PROCESS = ("decode", "prefix", "spec")     # bench modes that load the model; the rest are clients


def _bench(args: argparse.Namespace) -> int:
    from reprise.bench import run_bench
    return run_bench(args, _llm_kwargs(args) if args.what in IN_PROCESS else {})


def _route(args: argparse.Namespace) -> int:
    from reprise.router.app import route
    return route(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reprise", description="LLM inference built around the prefix cache")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible API")
    serve.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                       help="GGUF file or Hugging Face directory (the same as --model)")
    _engine_flags(serve)
    from reprise.server.config import add_serve_flags
    add_serve_flags(serve)
    # a server lives long enough to repay the compile (cached after the first start)
    serve.set_defaults(run=_serve, compile=True)

    generate = commands.add_parser("generate", help="complete one prompt")
    _engine_flags(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--sampling-seed", type=int, default=None)
    generate.add_argument("--chat-template", action="store_true", help="wrap the prompt as one user message")
    generate.set_defaults(run=_generate)

    chat = commands.add_parser("chat", help="interactive multi-turn chat, streamed")
    _engine_flags(chat)
    chat.add_argument("--system", default=None)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(run=_chat)

    from reprise.bench import add_bench_parser
    add_bench_parser(commands, _engine_flags).set_defaults(run=_bench)

    route = commands.add_parser("route", help="route requests over replicas by where their prefix is cached")
    from reprise.router.app import add_route_flags
    add_route_flags(route)
    route.set_defaults(run=_route)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from reprise.loader import LoadError
    try:
        return args.run(args)
    except (LoadError, ValueError) as error:       # a bad file or flag: one line, not a traceback
        print(f"reprise: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
