"""API keys: ``Authorization: Bearer <key>``; a session belongs to the key that created it."""

from __future__ import annotations

import hmac

from service.engine.errors import Unauthorized


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None if there is none."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    return token.strip()


def check_key(api_keys: list[str], token: str | None) -> str | None:
    """Return the caller's identity (its key) or None when no keys are configured."""
    if not api_keys:
        return None
    if token is None:
        raise Unauthorized("this service needs an API key: send 'Authorization: Bearer <key>'")
    for key in api_keys:
        if hmac.compare_digest(key.encode(), token.encode()):
            return key
    raise Unauthorized("the API key is not valid")


def identify(
    api_keys: list[str], authorization: str | None, token: str | None = None
) -> str | None:
    """The caller's key from ``Authorization: Bearer`` (or a ``token`` parameter), checked.

    Without configured keys the service identifies nobody and ignores the header, so a proxy that
    adds its own ``Authorization`` does not break it.
    """
    if not api_keys:
        return None
    return check_key(api_keys, bearer_token(authorization) or token)
