"""GenerateService: a whole generation behind one server-streaming call, over the async client.

    python -m specmesh.clients.gateway --verify-addr H:P [--draft-addr H:P] [--tokenizer DIR] [--port P]
    (also `specmesh serve gateway ...`)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib

from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.chat_template import ChatTemplate
from specmesh.clients.http_server import HttpServer, start_http
from specmesh.clients.openai_api import build_app
from specmesh.clients.types import DEFAULT_TREE, SAMPLING_FIELDS, GenerationParams
from specmesh.v1 import generate_pb2, generate_pb2_grpc
from specmesh.wire.config_args import add_dataclass_args, from_args
from specmesh.wire.errors import InvalidRequest
from specmesh.wire.metrics import MetricsInterceptor, ServiceMetrics, start_metrics_server
from specmesh.wire.security import Security, TokenTable
from specmesh.wire.server import build_server, die_with_parent, serve_until_signal
from specmesh.wire.tree_spec import TreeSpec

SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["GenerateService"].full_name
FINISH = {"length": generate_pb2.FINISH_REASON_LENGTH, "eos": generate_pb2.FINISH_REASON_EOS,
          "stop": generate_pb2.FINISH_REASON_STOP,
          "cancelled": generate_pb2.FINISH_REASON_CANCELLED}
GATEWAY_MAX_MESSAGE_BYTES = 4 << 20  # a request is a prompt (capped per context token anyway)


def to_params(req: generate_pb2.GenerateRequest, defaults: GenerationParams) -> GenerationParams:
    """Request -> GenerationParams, checked once (by GenerationParams itself); InvalidRequest
    names the request's field (`sampling.top_p`, `tree_spec.chain_length`)."""
    max_new_tokens = (req.max_new_tokens if req.HasField("max_new_tokens")
                      else defaults.max_new_tokens)
    tree = TreeSpec.from_proto(req.tree_spec) if req.HasField("tree_spec") else defaults.tree
    speculate = req.speculate if req.HasField("speculate") else defaults.speculate
    s = req.sampling
    try:
        return GenerationParams(
            max_new_tokens=max_new_tokens, temperature=s.temperature,
            top_p=s.top_p if s.HasField("top_p") else 1.0, top_k=s.top_k,
            seed=s.seed if s.HasField("seed") else None, stop=tuple(req.stop),
            ignore_eos=req.ignore_eos, tree=tree, speculate=speculate and tree.enabled,
            adaptive=req.adaptive if req.HasField("adaptive") else defaults.adaptive)
    except InvalidRequest as exc:
        raise InvalidRequest(_request_field(exc.field), exc.problem) from exc


def _request_field(field: str) -> str:
    """GenerationParams' field name as the GenerateRequest path."""
    if field in SAMPLING_FIELDS:
        return f"sampling.{field}"
    if field.startswith("tree"):
        return "tree_spec" + field[len("tree"):]
    return field


class GenerateServicer(generate_pb2_grpc.GenerateServiceServicer):
    def __init__(self, client: AsyncSpecMeshClient, defaults: GenerationParams | None = None,
                 metrics: ServiceMetrics | None = None):
        self.client = client
        self.defaults = defaults or GenerationParams()
        self.metrics = metrics or ServiceMetrics("gateway")
        self.http: HttpServer | None = None  # the OpenAI-compatible API, when served
        self.metrics_port: int | None = None  # where its Prometheus metrics are served

    async def Generate(self, request, context):
        params = to_params(request, self.defaults)
        which = request.WhichOneof("prompt")
        if which == "text":
            prompt = request.text
        elif which == "token_ids":
            prompt = list(request.token_ids.ids)
        else:
            raise InvalidRequest("prompt", "set text or token_ids")
        vocab = self.client.target_info.vocab_size
        if isinstance(prompt, list):
            for i, t in enumerate(prompt):
                if not 0 <= t < vocab:
                    raise InvalidRequest(f"token_ids.ids[{i}]", f"{t} outside [0, {vocab})")
        async for ev in self.client.stream(prompt, params.max_new_tokens, params=params):
            msg = generate_pb2.GenerateResponse(token_ids=ev.token_ids, text=ev.text)
            if ev.result is not None:
                s, r = ev.result.stats, ev.result
                self.metrics.observe_tokens(len(r.token_ids), s.total_time_s)
                msg.finish_reason = FINISH[r.finish_reason]
                msg.matched_stop = r.matched_stop or ""
                msg.stats.CopyFrom(generate_pb2.GenerationStats(
                    num_rounds=s.num_rounds, num_draft_tokens=s.num_draft_tokens,
                    num_accepted_tokens=s.num_accepted_tokens,
                    num_prompt_tokens=len(r.prompt_token_ids),
                    num_generated_tokens=len(r.token_ids), tokens_per_s=s.tokens_per_s,
                    time_to_first_token_s=s.time_to_first_token_s, total_time_s=s.total_time_s,
                    mean_accepted_per_round=s.mean_accepted_per_round, cache_hit=s.cache_hit))
            yield msg


async def start_gateway(verify_addr: str, draft_addr: str | None, tokenizer_dir: str | None,
                        port: int = 0, host: str = "127.0.0.1",
                        defaults: GenerationParams | None = None, cache_addr: str | None = None,
                        metrics_port: int | None = None,
                        max_message_bytes: int = GATEWAY_MAX_MESSAGE_BYTES,
                        http_port: int | None = None, http_host: str = "127.0.0.1",
                        metrics_host: str = "127.0.0.1", security: Security | None = None):
    """Connect the client, bind the gateway (SERVING once connected); return (server,
    servicer). With `http_port` the OpenAI-compatible HTTP API runs too (`servicer.http`).
    `security`: the gateway's TLS and tokens, as a server (gRPC and HTTP) and towards the
    services (its own token, a `service` one: it writes the result cache)."""
    security = security or Security()
    client = AsyncSpecMeshClient(verify_addr, draft_addr, tokenizer_dir, cache_addr=cache_addr,
                                 security=security)
    await client.connect()
    metrics = ServiceMetrics("gateway")
    servicer = GenerateServicer(client, defaults, metrics)
    if metrics_port is not None:
        servicer.metrics_port = start_metrics_server(metrics_port, metrics, metrics_host)
    server = await build_server([(generate_pb2_grpc.add_GenerateServiceServicer_to_server,
                                  servicer)], [SERVICE_NAME], port=port, host=host,
                                interceptors=[MetricsInterceptor(metrics)],
                                max_message_bytes=max_message_bytes, security=security)
    await server.start()
    if http_port is not None:
        chat = ChatTemplate.from_model_dir(tokenizer_dir) if tokenizer_dir else None
        name = pathlib.Path(tokenizer_dir) if tokenizer_dir else None
        name = (name.stem if name.suffix == ".gguf" else name.name) if name else None
        tokens = TokenTable(security.token_file) if security.token_file else None
        servicer.http = await start_http(build_app(client, servicer.defaults, name, chat, tokens),
                                         http_host, http_port, ssl_certfile=security.tls_cert,
                                         ssl_keyfile=security.tls_key)
    await server.set_serving(True)
    return server, servicer


async def serve(args: argparse.Namespace) -> None:
    defaults = GenerationParams(tree=TreeSpec.parse(args.tree), adaptive=args.adaptive,
                                speculate=args.draft_addr is not None)
    server, servicer = await start_gateway(args.verify_addr, args.draft_addr, args.tokenizer,
                                           args.port, args.host, defaults, args.cache_addr,
                                           args.metrics_port,
                                           int(args.max_message_mb * (1 << 20)),
                                           args.http_port, args.host, args.metrics_host,
                                           from_args(Security, args))
    if servicer.metrics_port is not None:
        print(f"metrics on http://{args.metrics_host}:{servicer.metrics_port}/metrics",
              flush=True)
    if servicer.http is not None:
        scheme = "https" if args.tls_cert else "http"
        print(f"OpenAI-compatible HTTP on {scheme}://{args.host}:{servicer.http.port}/v1",
              flush=True)
    print(f"{SERVICE_NAME} listening on {args.host}:{server.port}", flush=True)
    await serve_until_signal(server, ready_line=f"SERVING {args.host}:{server.port}")
    if servicer.http is not None:
        await servicer.http.stop()
    await servicer.client.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specmesh serve gateway")
    parser.add_argument("--verify-addr", required=True)
    parser.add_argument("--draft-addr", default=None, help="omit for target-only decoding")
    parser.add_argument("--cache-addr", default=None, help="cache service, for the result cache")
    parser.add_argument("--tokenizer", default=None, help="model folder with tokenizer.json")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tree", default=str(DEFAULT_TREE), help="default tree spec")
    parser.add_argument("--adaptive", action="store_true", help="adaptive speculation default")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics here (0 = a free port)")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address the metrics server binds (default loopback only)")
    parser.add_argument("--http-port", type=int, default=None,
                        help="also serve the OpenAI-compatible HTTP API here (0 = free port)")
    parser.add_argument("--max-message-mb", type=float,
                        default=GATEWAY_MAX_MESSAGE_BYTES / (1 << 20),
                        help="largest gRPC message either way, MiB")
    add_dataclass_args(parser, Security)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    die_with_parent()
    logging.basicConfig(level=logging.INFO)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
