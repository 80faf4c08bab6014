"""The `specmesh` command: generate, serve, up, bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.chat_template import ChatTemplate
from specmesh.clients.local_stack import LocalStack, ServiceProcess
from specmesh.clients.models import NGRAM, resolve_pair
from specmesh.clients.types import DEFAULT_TREE, NGRAM_TREE, GenerationParams
from specmesh.wire.errors import SpecMeshError
from specmesh.wire.tree_spec import TreeSpec

SERVICE_MODULES = {"draft": "specmesh.draft_service", "verify": "specmesh.verify_service",
                   "cache": "specmesh.cache_service", "gateway": "specmesh.clients.gateway"}


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=GenerationParams.max_new_tokens)
    p.add_argument("--k", type=int, default=None, help="chain length (same as --tree chain:K)")
    p.add_argument("--tree", default=None,
                   help="chain:K | static:B1,B2,.. | dynamic:N[/D] | ngram:N | none")
    p.add_argument("--no-spec", action="store_true", help="target-only decoding (no draft)")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="size the tree every round (at most --tree) from measured acceptance "
                        "and costs (default: on for chains, except for --seed with a "
                        "--temperature; --no-adaptive: the fixed tree every round)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--draft", default=None, help="draft model folder (or name under "
                   "SPECMESH_MODEL_DIR), or 'ngram': model-free n-gram drafting")
    p.add_argument("--target", default=None, help="target model folder")
    p.add_argument("--draft-addr", default=None, help="host:port of a running draft service")
    p.add_argument("--verify-addr", default=None, help="host:port of a running verify service")
    _add_stack_args(p)


def _add_stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None, help="Redis for the cache service (default: an "
                   "embedded redis-server on a free port, stopped after)")
    p.add_argument("--no-cache", action="store_true", help="run without the cache service")
    p.add_argument("--cache-addr", default=None, help="host:port of a running cache service")
    p.add_argument("--ngram-fleet", action="store_true", help="n-gram drafting also reads and "
                   "feeds the fleet n-gram table in the cache's Redis (keyed by the target model)")
    p.add_argument("--secure", action="store_true", help="a local stack with TLS, bearer tokens "
                   "and a cache MAC key (a throwaway CA and secrets, deleted with the stack)")
    p.add_argument("--device", default="cpu", help="torch device of the local stack's model "
                   "services: cpu, or cuda on a GPU (CUDA graphs, the tree-attention kernel)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="weights/KV dtype of the local stack's model services (default "
                        "float32; bfloat16 on a GPU)")


def _ngram_fleet(args: argparse.Namespace) -> bool:
    if args.ngram_fleet and args.no_cache:
        raise SystemExit("specmesh: --ngram-fleet keeps its table in the cache service's Redis; "
                         "drop --no-cache")
    return args.ngram_fleet


def _draft_method(draft) -> str:
    return "ngram" if draft is None else "model"


def generation_params(args: argparse.Namespace) -> GenerationParams:
    """The one place CLI flags become GenerationParams."""
    if args.tree:
        tree = TreeSpec.parse(args.tree)
    elif args.k is not None:
        tree = TreeSpec.parse(f"chain:{args.k}")
    elif args.draft == NGRAM:
        tree = NGRAM_TREE
    else:
        tree = GenerationParams().tree
    params = GenerationParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
        tree=tree, speculate=not args.no_spec and tree.enabled, adaptive=args.adaptive)
    return params  # validated on construction, before any stack starts


def chat_prompts(model, messages: list[str], codec) -> list[list[int]]:
    """Each message as one user turn of the model's chat template, as token ids."""
    chat = ChatTemplate.from_model_dir(model)
    if chat is None:
        raise ValueError(f"{model} has no chat template; drop --chat")
    return [chat.encode([{"role": "user", "content": m}], codec) for m in messages]


async def _generate(args: argparse.Namespace) -> int:
    params = generation_params(args)
    target, draft = resolve_pair(args.target, args.draft)
    if args.verify_addr:
        stack = None
        verify_addr, draft_addr, cache_addr = args.verify_addr, args.draft_addr, args.cache_addr
    else:
        stack = LocalStack(target, None if not params.speculate else draft,
                           draft_method=_draft_method(draft) if params.speculate else "model",
                           cache=not args.no_cache, redis_url=args.redis_url, quiet=args.json,
                           secure=args.secure, ngram_fleet=_ngram_fleet(args),
                           device=args.device, dtype=args.dtype)
        await stack.__aenter__()
        verify_addr, draft_addr, cache_addr = stack.verify_addr, stack.draft_addr, stack.cache_addr
    # a stack of our own: this process is one of its fleet (it may write the result cache)
    security = stack.service_security() if stack is not None else None
    try:
        async with AsyncSpecMeshClient(verify_addr, draft_addr if params.speculate else None,
                                       tokenizer_dir=str(target),
                                       cache_addr=None if args.no_cache else cache_addr,
                                       security=security) as client:
            prompt = (chat_prompts(target, [args.prompt], client.codec)[0] if args.chat
                      else args.prompt)
            if args.json:
                result = await client.generate(prompt, params.max_new_tokens, params=params)
                print(json.dumps(result.to_json()))
            else:
                print(args.prompt if args.chat else prompt, end="\n" if args.chat else "",
                      flush=True)
                async for ev in client.stream(prompt, params.max_new_tokens, params=params):
                    print(ev.text, end="", flush=True)
                    if ev.result is not None:
                        s = ev.result.stats
                        print(f"\n\n[{len(ev.result.token_ids)} tokens, {s.tokens_per_s:.1f} tok/s, "
                              f"{s.num_rounds} rounds, {s.mean_accepted_per_round:.2f} accepted "
                              f"per round, tree {ev.result.tree}, finish: "
                              f"{ev.result.finish_reason}]", file=sys.stderr)
    finally:
        if stack is not None:
            await stack.__aexit__(None, None, None)
    return 0


async def _up(args: argparse.Namespace) -> int:
    """Start draft, verify, cache (embedded Redis) and the gateway; keep them until Ctrl-C."""
    import signal

    target, draft = resolve_pair(args.target, args.draft)
    tree = args.tree or str(NGRAM_TREE if draft is None else DEFAULT_TREE)
    async with LocalStack(target, draft, draft_method=_draft_method(draft),
                          cache=not args.no_cache, redis_url=args.redis_url,
                          metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                          secure=args.secure, ngram_fleet=_ngram_fleet(args),
                          device=args.device, dtype=args.dtype) as stack:
        gw_args = ["specmesh.clients.gateway", "--verify-addr", stack.verify_addr, "--draft-addr",
                   stack.draft_addr, "--tokenizer", str(target), "--port", str(args.port),
                   "--tree", tree, "--http-port", str(args.http_port),
                   *stack.metrics_args("gateway"), *stack.security_args()]
        if stack.cache_addr:
            gw_args += ["--cache-addr", stack.cache_addr]
        gateway = ServiceProcess("gateway", gw_args, security=stack.service_security())
        await gateway.start()
        try:
            urls = {"gateway": gateway.address,
                    "http": gateway.printed("OpenAI-compatible HTTP on "),
                    "verify": stack.verify_addr, "draft": stack.draft_addr,
                    "cache": stack.cache_addr}
            if args.metrics_port is not None:
                metrics = dict(stack.metrics_urls)
                metrics["gateway"] = gateway.metrics_url
                urls["metrics"] = metrics
            if stack.secrets is not None:  # what a client needs to get in
                urls["tls_ca"] = str(stack.secrets.ca)
                urls["token"] = stack.secrets.client_token
            print(json.dumps(urls), flush=True)
            print("specmesh up: stack running; Ctrl-C to stop", file=sys.stderr, flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            gateway.stop()
    return 0


def _exec_module(module: str, rest: list[str]) -> int:
    """Replace this process with `python -m module ...` (services are never imported here),
    without the working directory on sys.path: from a checkout its `kernels/` folder would
    shadow Hugging Face's `kernels`, which transformers imports (ours is specmesh.kernels)."""
    os.execve(sys.executable, [sys.executable, "-m", module, *rest],
              dict(os.environ, PYTHONSAFEPATH="1"))
    return 0  # not reached


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    """Replace this process with `python -m <service> ...` (services are never imported here)."""
    return _exec_module(SERVICE_MODULES[args.service], rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text (starts a local stack if no addresses)")
    gen.add_argument("prompt")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--chat", action="store_true", help="the prompt is a user message: apply "
                     "the model's chat template (generation stops at its end of turn)")
    _add_generation_args(gen)
    serve = sub.add_parser("serve", help="run one service (flags go to it; see --help there)",
                           add_help=False)
    serve.add_argument("service", choices=sorted(SERVICE_MODULES))
    up = sub.add_parser("up", help="start draft, verify, cache and gateway; keep them running")
    up.add_argument("--draft", default=None, help="draft model folder or name, or 'ngram' "
                    "(model-free n-gram drafting)")
    up.add_argument("--target", default=None)
    up.add_argument("--port", type=int, default=50051, help="gateway port (0 = free port)")
    up.add_argument("--tree", default=None, help="the gateway's default tree spec (default "
                    f"{DEFAULT_TREE}; {NGRAM_TREE} with --draft ngram)")
    up.add_argument("--http-port", type=int, default=8000,
                    help="the gateway's OpenAI-compatible HTTP API (0 = free port)")
    up.add_argument("--metrics-port", type=int, default=None,
                    help="Prometheus metrics for every service: 0 = a free port each; N = gateway "
                    "N, verify N+1, draft N+2, cache N+3 (URLs printed)")
    up.add_argument("--metrics-host", default="127.0.0.1",
                    help="address the metrics servers bind (default loopback only)")
    _add_stack_args(up)
    sub.add_parser("bench", help="benchmark (python -m specmesh.loadtest.bench; see --help there)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        return _serve(args, rest)
    if args.command == "bench":
        return _exec_module("specmesh.loadtest.bench", rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "up":
            return asyncio.run(_up(args))
        return asyncio.run(_generate(args))
    except (SpecMeshError, FileNotFoundError, ValueError) as exc:
        print(f"specmesh: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
