"""Bearer-token checks for the HTTP API.

Mutations always need `Authorization: Bearer <token>`; reads need it only when `serve.protect_reads` is set.
The token comes from `pipeline.config.env_token(cfg)` (env VMEM_TOKEN wins over `serve.token`). With no token
configured the server refuses every protected request (403) and says how to set one, rather than running an
open, writable memory by accident.
"""
from __future__ import annotations

import hmac
from typing import Optional

from pipeline.serve.limits import ApiError

NO_TOKEN_MESSAGE = ("this server has no API token configured, so it refuses {what}: set the VMEM_TOKEN "
                    "environment variable (or serve.token in the config) before `vmem serve`, then send "
                    "`Authorization: Bearer <token>`")


def check_bearer(header: Optional[str], token: Optional[str], what: str = "changes to the memory") -> None:
    """Raise ApiError 401 (no/garbled header), 403 (wrong token, or no token configured); return if allowed."""
    if not token:
        raise ApiError(403, NO_TOKEN_MESSAGE.format(what=what))
    if not header:
        raise ApiError(401, "missing `Authorization: Bearer <token>` header")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "the Authorization header must be `Bearer <token>`")
    # Constant-time comparison: response timing must not leak how much of a guessed token was right.
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(403, "wrong API token")
