"""Who may call the administrative RPCs: the model repository's RepositoryIndex, RepositoryModelLoad and
RepositoryModelUnload (they switch what every client is served).

With `--admin-token-file FILE`, those calls must carry the file's token as gRPC metadata
`authorization: Bearer <token>` (compared in constant time), else UNAUTHENTICATED; the inference and
health RPCs never need it. With `--tls-client-ca` every call, these included, already needs a client
certificate from that CA (tls.py). A server with model control on a non-loopback address and neither of
the two refuses to start (config.ServerConfig), so repository control is never open to the network.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from neuronserve.errors import ConfigError, Unauthenticated

MIN_TOKEN_BYTES = 16
METADATA_KEY = "authorization"


def load_token(path: str) -> bytes:
    """The token in `path` (surrounding whitespace dropped): one-line ConfigErrors for a missing,
    unreadable, empty or short file."""
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"--admin-token-file {path}: cannot read it ({exc.strerror or exc})") from None
    if len(token) < MIN_TOKEN_BYTES or b"\n" in token:
        raise ConfigError(
            f"--admin-token-file {path}: the token must be one line of at least {MIN_TOKEN_BYTES} bytes "
            "(e.g. `openssl rand -hex 32 > FILE`)"
        )
    return token


class AdminGuard:
    """check(context): nothing when the call carries `authorization: Bearer <token>`, else Unauthenticated."""

    def __init__(self, token: bytes) -> None:
        self._expected = b"Bearer " + token

    def check(self, context) -> None:
        sent = next((value for key, value in (context.invocation_metadata() or ()) if key == METADATA_KEY), "")
        sent = sent.encode() if isinstance(sent, str) else bytes(sent)
        if not hmac.compare_digest(sent, self._expected):
            raise Unauthenticated(
                "the model repository RPCs need the admin token: send metadata "
                "'authorization: Bearer <token>' (the server's --admin-token-file)"
            )
