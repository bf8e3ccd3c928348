"""Who may talk to the daemon: the bearer token, TLS credentials, and the loopback rule.

The token travels as gRPC metadata `authorization: Bearer <token>` (and as the same HTTP
header on /metrics). A daemon without a token may only listen on a loopback address.
The standard gRPC health-checking service stays open so load balancers and probes work.
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path

import grpc

OPEN_METHODS_PREFIX = "/grpc.health.v1.Health/"
AUTH_KEY = "authorization"


def read_token(path: str | Path | None, what: str = "--token-file") -> str | None:
    if path is None:
        return None
    p = Path(path)
    try:
        token = p.read_text().strip()
    except OSError as e:
        raise FileNotFoundError(f"{what} {p}: cannot read the token ({e.strerror}); create it, e.g. "
                                f"`python -c 'import secrets; print(secrets.token_urlsafe(32))' > {p}`") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{what} {p}: the token must be one non-empty word; write a single line without spaces")
    return token


def split_host_port(addr: str, what: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ValueError(f"{what} {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:50051")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(addr: str, token: str | None, what: str = "--bind") -> tuple[str, int]:
    host, port = split_host_port(addr, what)
    if token is None and not is_loopback(host):
        raise ValueError(f"{what} {addr}: refusing to listen on a non-loopback address without a token; "
                         f"pass --token-file F (and --tls-cert/--tls-key), or bind 127.0.0.1")
    return host, port


def bearer_ok(value: str | None, token: str) -> bool:
    return value is not None and hmac.compare_digest(value.encode(), f"Bearer {token}".encode())


def server_credentials(cert: str | None, key: str | None) -> grpc.ServerCredentials | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key: give both (PEM certificate chain and its private key) or neither")
    try:
        return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
    except OSError as e:
        raise FileNotFoundError(f"--tls-cert/--tls-key: cannot read {e.filename} ({e.strerror})") from None


def client_credentials(ca: str | None) -> grpc.ChannelCredentials | None:
    if ca is None:
        return None
    try:
        return grpc.ssl_channel_credentials(Path(ca).read_bytes())
    except OSError as e:
        raise FileNotFoundError(f"--tls-ca {ca}: cannot read the CA certificate ({e.strerror})") from None


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((AUTH_KEY, f"Bearer {token}"),) if token else ()


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right bearer token with UNAUTHENTICATED (checked once per
    call, so a heartbeat stream pays it once, not per message)."""

    DENIED = "missing or wrong token: send metadata 'authorization: Bearer <token>' with the daemon's token"

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHODS_PREFIX):
            return await continuation(details)
        value = next((v for k, v in details.invocation_metadata or () if k == AUTH_KEY), None)
        if bearer_ok(value if isinstance(value, str) else None, self.token):
            return await continuation(details)
        handler = await continuation(details)
        return None if handler is None else _denying(handler)


async def _deny(_request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, TokenInterceptor.DENIED)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    # Same shape as the real handler, so the client sees the status, not a protocol error.
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[(handler.request_streaming, handler.response_streaming)](_deny)
