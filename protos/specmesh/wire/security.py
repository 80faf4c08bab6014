"""TLS and bearer-token authentication for every gRPC server and client: one config object.

    sec = Security(tls_cert="server.pem", tls_key="server.key", tls_ca="ca.pem",
                   token_file="tokens.txt", token="...")
    server = await build_server(..., security=sec)   # TLS (mTLS with tls_client_auth) + tokens
    channel = sec.channel("host:port")                # TLS against tls_ca, sends `token`

Tokens file: one `ROLE TOKEN` per line (`#` comments), roles `client` (may generate, verify,
propose, read the cache), `service` (fleet members: model services and gateways; may also write
the cache), `operator` (everything, including reflection). It is re-read when it changes, so a
token is rotated by editing the file. Health checks never need a token. Every field falls back to
an environment variable (SPECMESH_TLS_CERT, SPECMESH_TLS_KEY, SPECMESH_TLS_CA,
SPECMESH_TLS_CLIENT_AUTH, SPECMESH_TOKEN_FILE, SPECMESH_TOKEN, SPECMESH_CACHE_KEY_FILE) when not
given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import pathlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

ROLES = ("client", "service", "operator")
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
# method prefix -> roles allowed; the first match wins; anything else: every role
RULES: tuple[tuple[str, frozenset[str]], ...] = (
    ("/specmesh.v1.CacheService/Put", frozenset({"service", "operator"})),
    ("/grpc.reflection.", frozenset({"operator"})),
)


def _env(name: str) -> str | None:
    return os.environ.get(f"SPECMESH_{name.upper()}") or None


@dataclass(frozen=True)
class Security:
    tls_cert: str | None = None
    """PEM certificate this process presents (as a server; as a client too under mTLS)."""
    tls_key: str | None = None
    """PEM private key of --tls-cert."""
    tls_ca: str | None = None
    """PEM CA: clients verify servers against it; with --tls-client-auth servers require client
    certificates it signed (mTLS)."""
    tls_client_auth: bool = False
    """Servers: require a client certificate signed by --tls-ca (mTLS)."""
    token_file: str | None = None
    """Servers: accepted bearer tokens, one 'ROLE TOKEN' per line (client, service, operator),
    re-read when it changes. Unset: no authentication."""
    token: str | None = None
    """Bearer token this process sends to the services it calls."""
    reflection: bool = True
    """Serve gRPC reflection (operators only when tokens are on)."""
    cache_key_file: str | None = None
    """Fleet secret for cache values: prefix chunks and results are stored with an HMAC under
    it and a value without a valid one is a miss. Unset: the cache trusts its writers."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and _env(f.name):
                object.__setattr__(self, f.name, _env(f.name))
        if not self.tls_client_auth and _env("tls_client_auth") in ("1", "true", "yes"):
            object.__setattr__(self, "tls_client_auth", True)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_auth and not (self.tls_ca and self.tls_cert):
            raise ValueError("--tls-client-auth needs --tls-ca and a server certificate")

    @property
    def cache_key(self) -> bytes | None:
        """The fleet's cache HMAC key (the secret file's bytes, surrounding blanks stripped)."""
        if self.cache_key_file is None:
            return None
        key = pathlib.Path(self.cache_key_file).read_bytes().strip()
        if len(key) < 16:
            raise ValueError(f"{self.cache_key_file}: a cache key needs >= 16 bytes")
        return key

    @property
    def tls(self) -> bool:
        """Do the channels this process opens use TLS (it trusts a CA)?"""
        return self.tls_ca is not None

    # -- server side ---------------------------------------------------------------------------
    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None:
            return None
        ca = _read(self.tls_ca) if self.tls_client_auth else None
        return grpc.ssl_server_credentials([(_read(self.tls_key), _read(self.tls_cert))],
                                           root_certificates=ca,
                                           require_client_auth=self.tls_client_auth)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [AuthInterceptor(TokenTable(self.token_file))] if self.token_file else []

    # -- client side ---------------------------------------------------------------------------
    def channel(self, address: str, options: Sequence[tuple[str, object]] = ()
                ) -> grpc.aio.Channel:
        """A grpc.aio channel to `address`: TLS when a CA is set (with our certificate under
        mTLS), the bearer token on every call when one is set."""
        interceptors = token_interceptors(self.token) if self.token else None
        # its own connection (no subchannel shared with other channels of this process): a
        # service without authentication keeps each connection's sequences apart
        options = [*options, ("grpc.use_local_subchannel_pool", 1)]
        if not self.tls:
            return grpc.aio.insecure_channel(address, options=list(options),
                                             interceptors=interceptors)
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca),
            private_key=_read(self.tls_key) if self.tls_key else None,
            certificate_chain=_read(self.tls_cert) if self.tls_cert else None)
        return grpc.aio.secure_channel(address, creds, options=list(options),
                                       interceptors=interceptors)


def _read(path: str | None) -> bytes | None:
    return None if path is None else pathlib.Path(path).read_bytes()


class TokenTable:
    """token -> role from a tokens file, re-read when its mtime or size changes."""

    def __init__(self, path: str):
        self.path = pathlib.Path(path)
        self._stamp: tuple[float, int] | None = None
        self._roles: dict[bytes, str] = {}
        self._lock = threading.Lock()
        self.role_of(b"")  # read now: a bad file fails at start, not on the first call

    def role_of(self, token: bytes) -> str | None:
        st = self.path.stat()
        with self._lock:
            if (st.st_mtime, st.st_size) != self._stamp:
                self._roles = parse_tokens(self.path.read_text())
                self._stamp = (st.st_mtime, st.st_size)
            # compare every entry in constant time (no early exit on a prefix)
            found = None
            for known, role in self._roles.items():
                if hmac.compare_digest(known, token):
                    found = role
            return found


def parse_tokens(text: str) -> dict[bytes, str]:
    roles = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ROLES:
            raise ValueError(f"tokens file line {n}: want 'ROLE TOKEN' with ROLE in {ROLES}")
        roles[parts[1].encode()] = parts[0]
    return roles


def allowed_roles(method: str) -> frozenset[str]:
    for prefix, roles in RULES:
        if method.startswith(prefix):
            return roles
    return frozenset(ROLES)


def bearer(metadata) -> bytes | None:
    """The token of an `authorization: Bearer <token>` metadata entry, if any."""
    for key, value in metadata or ():
        if key == "authorization":
            value = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = value.partition(" ")
            return token.strip().encode() if scheme.lower() == "bearer" else None
    return None


def caller_identity(context) -> str:
    """Who is calling, for per-caller ownership of sequences: the token (hashed), else the mTLS
    certificate identity, else the connection (auth off: each connection its own namespace)."""
    token = bearer(context.invocation_metadata())
    if token:
        return "t:" + hashlib.sha256(token).hexdigest()[:16]
    identities = context.peer_identities()
    if identities:
        return "x509:" + identities[0].decode(errors="replace")
    return "peer:" + context.peer()


def _deny(code: grpc.StatusCode, message: str, handler: grpc.RpcMethodHandler):
    async def unary(request, context):
        await context.abort(code, message)

    async def stream(request_or_iterator, context):
        await context.abort(code, message)
        yield  # pragma: no cover - an async generator that never yields

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC but health carries a known bearer token whose role may call the method:
    UNAUTHENTICATED without one (or with an unknown one), PERMISSION_DENIED for the wrong role."""

    def __init__(self, table: TokenTable):
        self.table = table

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        token = bearer(details.invocation_metadata)
        if not token:
            return _deny(grpc.StatusCode.UNAUTHENTICATED,
                         "missing bearer token (metadata 'authorization: Bearer <token>')",
                         handler)
        role = self.table.role_of(token)
        if role is None:
            return _deny(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token", handler)
        if role not in allowed_roles(details.method):
            return _deny(grpc.StatusCode.PERMISSION_DENIED,
                         f"role {role!r} may not call {details.method}", handler)
        return handler


class _TokenDetails(grpc.aio.ClientCallDetails):
    pass


class _AddToken:
    """Adds `authorization: Bearer <token>` to a call's metadata."""

    def __init__(self, token: str):
        self.entry = ("authorization", f"Bearer {token}")

    def _details(self, d):
        metadata = grpc.aio.Metadata(*(d.metadata or ()), self.entry)
        return _TokenDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


class _UnaryUnary(_AddToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _UnaryStream(_AddToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _StreamUnary(_AddToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_AddToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def token_interceptors(token: str) -> list:
    """One interceptor per call kind (grpc.aio files each interceptor under one kind only)."""
    return [cls(token) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
