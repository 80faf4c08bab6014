"""GenerateService: a whole generation behind one server-streaming call, over the async client.

    python -m specmesh.clients.gateway --verify-addr H:P [--draft-addr H:P] [--tokenizer DIR] [--port P]
    (also `specmesh serve gateway ...`)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib

from specmesh.clients.http_server import HttpServer, start_http
from specmesh.clients.model_router import ModelRouter
from specmesh.clients.openai_api import build_app
from specmesh.clients.registry import ModelEntry, Registry
from specmesh.clients.types import DEFAULT_TREE, SAMPLING_FIELDS, GenerationParams, GenerationResult
from specmesh.v1 import generate_pb2, generate_pb2_grpc
from specmesh.wire.config_args import add_dataclass_args, from_args
from specmesh.wire.errors import InvalidRequest
from specmesh.wire.metrics import MetricsInterceptor, ServiceMetrics, start_metrics_server
from specmesh.wire.security import Security, TokenTable
from specmesh.wire.server import build_server, die_with_parent, serve_until_signal
from specmesh.wire.tree_spec import TreeSpec

log = logging.getLogger(__name__)
PRIORITY = {generate_pb2.PRIORITY_UNSPECIFIED: "interactive",
            generate_pb2.PRIORITY_INTERACTIVE: "interactive", generate_pb2.PRIORITY_BATCH: "batch"}
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
    if req.priority not in PRIORITY:
        raise InvalidRequest("priority", f"{req.priority}: not a Priority value")
    try:
        return GenerationParams(
            max_new_tokens=max_new_tokens, temperature=s.temperature,
            top_p=s.top_p if s.HasField("top_p") else 1.0, top_k=s.top_k,
            seed=s.seed if s.HasField("seed") else None, stop=tuple(req.stop),
            ignore_eos=req.ignore_eos, tree=tree, speculate=speculate and tree.enabled,
            adaptive=req.adaptive if req.HasField("adaptive") else defaults.adaptive,
            priority=PRIORITY[req.priority])
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
    def __init__(self, router: ModelRouter, metrics: ServiceMetrics | None = None):
        self.router = router
        self.metrics = metrics or ServiceMetrics("gateway")
        self.http: HttpServer | None = None  # the OpenAI-compatible API, when served
        self.metrics_port: int | None = None  # where its Prometheus metrics are served

    async def close(self) -> None:
        await self.router.close()

    async def ListModels(self, request, context):
        return list_models(self.router)

    async def Generate(self, request, context):
        which = request.WhichOneof("prompt")
        if which == "text":
            prompt = request.text
        elif which == "token_ids":
            prompt = list(request.token_ids.ids)
        else:
            raise InvalidRequest("prompt", "set text or token_ids")
        async with self.router.use(request.model) as route:
            params = route.check(to_params(request, route.defaults))
            vocab = route.client.target_info.vocab_size
            if isinstance(prompt, list):
                for i, t in enumerate(prompt):
                    if not 0 <= t < vocab:
                        raise InvalidRequest(f"token_ids.ids[{i}]", f"{t} outside [0, {vocab})")
            async for ev in route.client.stream(prompt, params.max_new_tokens, params=params):
                msg = generate_pb2.GenerateResponse(token_ids=ev.token_ids, text=ev.text)
                if ev.result is not None:
                    self._finish(msg, ev.result, route.entry.key, params.priority)
                yield msg

    def _finish(self, msg: generate_pb2.GenerateResponse, r: GenerationResult, model: str,
                priority: str) -> None:
        s = r.stats
        self.metrics.observe_tokens(len(r.token_ids), s.total_time_s)
        self.metrics.observe_generation(model, priority, len(r.token_ids),
                                        s.time_to_first_token_s, s.total_time_s, s.queue_time_s)
        msg.finish_reason = FINISH[r.finish_reason]
        msg.matched_stop = r.matched_stop or ""
        msg.model = model
        msg.stats.CopyFrom(generate_pb2.GenerationStats(
            num_rounds=s.num_rounds, num_draft_tokens=s.num_draft_tokens,
            num_accepted_tokens=s.num_accepted_tokens, num_prompt_tokens=len(r.prompt_token_ids),
            num_generated_tokens=len(r.token_ids), tokens_per_s=s.tokens_per_s,
            time_to_first_token_s=s.time_to_first_token_s, total_time_s=s.total_time_s,
            mean_accepted_per_round=s.mean_accepted_per_round, cache_hit=s.cache_hit))


def list_models(router: ModelRouter) -> generate_pb2.ListModelsResponse:
    reply = generate_pb2.ListModelsResponse(default_model=router.registry.default_entry.key)
    for e in router.entries:
        reply.models.add(name=e.name, version=e.version, key=e.key, is_default=e.default,
                         weight=e.weight, default_tree=e.tree.to_proto(),
                         max_new_tokens=e.max_new_tokens)
    return reply


def flags_registry(verify_addr: str, draft_addr: str | None, tokenizer_dir: str | None,
                   defaults: GenerationParams | None = None, cache_addr: str | None = None,
                   model_name: str | None = None) -> Registry:
    """The one-model registry of a gateway configured by flags; the model is named
    `model_name`, else after its tokenizer folder (or .gguf file), else "default"."""
    defaults = defaults or GenerationParams()
    if model_name is None and tokenizer_dir:
        path = pathlib.Path(tokenizer_dir)
        model_name = path.stem if path.suffix == ".gguf" else path.name
    return Registry.single(ModelEntry(
        model_name or "default", "1", verify_addr, draft_addr if defaults.speculate else None,
        cache_addr, tokenizer_dir, defaults.tree, defaults.adaptive, default=True))


async def start_gateway(verify_addr: str | None, draft_addr: str | None,
                        tokenizer_dir: str | None, port: int = 0, host: str = "127.0.0.1",
                        defaults: GenerationParams | None = None, cache_addr: str | None = None,
                        metrics_port: int | None = None,
                        max_message_bytes: int = GATEWAY_MAX_MESSAGE_BYTES,
                        http_port: int | None = None, http_host: str = "127.0.0.1",
                        metrics_host: str = "127.0.0.1", security: Security | None = None,
                        models: str | os.PathLike | None = None,
                        model_name: str | None = None):
    """Connect the models' clients, bind the gateway (SERVING once connected); return (server,
    servicer). The models come from `models` (a registry file, re-read by
    `servicer.router.reload()`) or from the flags (one model). With `http_port` the
    OpenAI-compatible HTTP API runs too (`servicer.http`). `security`: the gateway's TLS and
    tokens, as a server (gRPC and HTTP) and towards the services (its own token, a `service`
    one: it writes the result cache)."""
    security = security or Security()
    if models is not None:
        router = ModelRouter.from_file(models, security)
    else:
        router = ModelRouter(flags_registry(verify_addr, draft_addr, tokenizer_dir, defaults,
                                            cache_addr, model_name), security)
    await router.start()
    metrics = ServiceMetrics("gateway")
    servicer = GenerateServicer(router, metrics)
    if metrics_port is not None:
        servicer.metrics_port = start_metrics_server(metrics_port, metrics, metrics_host)
    server = await build_server([(generate_pb2_grpc.add_GenerateServiceServicer_to_server,
                                  servicer)], [SERVICE_NAME], port=port, host=host,
                                interceptors=[MetricsInterceptor(metrics)],
                                max_message_bytes=max_message_bytes, security=security)
    await server.start()
    if http_port is not None:
        tokens = TokenTable(security.token_file) if security.token_file else None
        servicer.http = await start_http(build_app(router, tokens, metrics), http_host,
                                         http_port, ssl_certfile=security.tls_cert,
                                         ssl_keyfile=security.tls_key)
    await server.set_serving(True)
    return server, servicer


async def serve(args: argparse.Namespace) -> None:
    if (args.models is None) == (args.verify_addr is None):
        raise SystemExit("specmesh serve gateway: give --models FILE or --verify-addr")
    defaults = GenerationParams(tree=TreeSpec.parse(args.tree), adaptive=args.adaptive,
                                speculate=args.draft_addr is not None)
    server, servicer = await start_gateway(args.verify_addr, args.draft_addr, args.tokenizer,
                                           args.port, args.host, defaults, args.cache_addr,
                                           args.metrics_port,
                                           int(args.max_message_mb * (1 << 20)),
                                           args.http_port, args.host, args.metrics_host,
                                           from_args(Security, args), args.models,
                                           args.model_name)
    if servicer.metrics_port is not None:
        print(f"metrics on http://{args.metrics_host}:{servicer.metrics_port}/metrics",
              flush=True)
    if servicer.http is not None:
        scheme = "https" if args.tls_cert else "http"
        print(f"OpenAI-compatible HTTP on {scheme}://{args.host}:{servicer.http.port}/v1",
              flush=True)
    print(f"{SERVICE_NAME} listening on {args.host}:{server.port}", flush=True)
    on_hup = _reloader(servicer.router) if args.models else None
    await serve_until_signal(server, ready_line=f"SERVING {args.host}:{server.port}",
                             on_hup=on_hup)
    if servicer.http is not None:
        await servicer.http.stop()
    await servicer.close()


def _reloader(router: ModelRouter):
    """SIGHUP: re-read the models file; a bad file is logged and the old table keeps serving."""
    async def reload() -> None:
        try:
            registry = await router.reload()
            print(f"models reloaded: {', '.join(registry.keys())}", flush=True)
        except Exception as exc:  # noqa: BLE001 - a bad file must not stop the gateway
            log.error("models not reloaded (%s); still serving %s", exc,
                      ", ".join(router.registry.keys()))
    return reload


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specmesh serve gateway")
    parser.add_argument("--models", default=None,
                        help="model registry file (TOML or YAML; re-read on SIGHUP) instead of "
                        "--verify-addr/--draft-addr/--tokenizer")
    parser.add_argument("--model-name", default=None,
                        help="the name a one-model gateway serves (default: the tokenizer "
                        "folder's name)")
    parser.add_argument("--verify-addr", default=None)
    parser.add_argument("--draft-addr", default=None, help="omit for target-only decoding")
    parser.add_argument("--cache-addr", default=None, help="cache service, for the result cache")
    parser.add_argument("--tokenizer", default=None, help="model folder with tokenizer.json")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tree", default=str(DEFAULT_TREE), help="default tree spec")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                        help="adaptive speculation by default (unset: on for chains, except "
                             "for seeded sampling; --no-adaptive: fixed trees)")
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
