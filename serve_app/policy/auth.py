"""API keys: optional bearer keys for the HTTP API, read from a file or an environment variable.

The serve YAML names only where the keys are (`auth.api_keys_file`, `auth.api_keys_env`), never
a key. The Router reads them once at start and keeps only their SHA-256 digests; a request's key
is hashed and compared with every digest by `hmac.compare_digest`, all of them each time, so
neither the comparison nor the number of keys tried leaks how close a guess came. Auth on but no
key found fails the Router's start with the field's name (never "auth silently off").

`/health` stays open. Callers of the deployment handles (`serve.get_app_handle`) are inside the
Ray cluster, which has its own access control, and are not checked.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from serve_app.config import AuthConfig
from serve_app.policy.errors import Rejection

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class ApiKeys:
    """The digests of the accepted keys; with none, every request passes (auth off)."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = tuple(_digest(key.encode("utf-8")) for key in keys)

    @classmethod
    def load(cls, cfg: AuthConfig, environ: Mapping[str, str] = os.environ) -> ApiKeys:
        """The keys `cfg` points at. Raises ValueError naming the field when a source is set
        but cannot be read or holds no key."""
        keys: list[str] = []
        if cfg.api_keys_file is not None:
            keys += _keys_from_file(Path(cfg.api_keys_file))
        if cfg.api_keys_env is not None:
            found = [k.strip() for k in environ.get(cfg.api_keys_env, "").split(",") if k.strip()]
            if not found:
                raise ValueError(
                    f"auth.api_keys_env: the environment variable {cfg.api_keys_env} is unset "
                    "or empty in the Router's process (set it where Ray starts)"
                )
            keys += found
        return cls(keys)

    @property
    def is_enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> None:
        """Raise a 401 `Rejection` unless `authorization` is `Bearer <an accepted key>`."""
        if not self._digests:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Rejection(
                401, "Missing API key: send it as `Authorization: Bearer <key>`.",
                "AuthenticationError", headers=_CHALLENGE,
            )
        # The header's own bytes: Starlette decodes headers as latin-1.
        digest = _digest(token.encode("latin-1", "replace"))
        matched = False
        for known in self._digests:  # no early exit
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise Rejection(401, "Invalid API key.", "AuthenticationError", headers=_CHALLENGE)


def _keys_from_file(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"auth.api_keys_file: cannot read {path}: {exc.strerror}") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [key for key in keys if key and not key.startswith("#")]
    if not keys:
        raise ValueError(f"auth.api_keys_file: {path} holds no key")
    return keys


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()
