"""API keys for the OpenAI-compatible API: ``Authorization: Bearer <key>``, checked in constant time.

Keys come from an env var of comma-separated keys (a Kubernetes secret mounted as env) and/or a file of their
SHA-256 hex digests, one per line, so the file holds nothing that can be replayed. Only digests are kept in
memory, and a request's key is compared by digest against every stored digest with ``hmac.compare_digest``.
Ray's own token auth does not cover Serve's HTTP data plane, so this is the API's only gate.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from pathlib import Path

from chatforge.config import AuthSpec

_HEX_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")
KEY_ID_LENGTH = 12


def key_digest(key: str) -> str:
    """The SHA-256 hex digest of a key: the line to put in an api_keys_file."""
    return hashlib.sha256(key.encode()).hexdigest()


def read_digest_file(path: str | Path) -> list[bytes]:
    """Digests from a file: one hex digest per line (a label after whitespace, as `sha256sum` writes, is allowed);
    blank lines and lines starting with ``#`` are skipped. A bad line raises ValueError naming file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the API key digest file: {err.strerror or err}") from None
    digests = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest = line.split()[0]
        if not _HEX_DIGEST.match(digest):
            raise ValueError(
                f"{path}:{number}: not a SHA-256 hex digest (64 hex characters); write "
                '`printf %s "$KEY" | sha256sum` output, never the key itself'
            )
        digests.append(bytes.fromhex(digest))
    return digests


class ApiKeys:
    def __init__(self, digests: list[bytes]) -> None:
        self._digests = tuple(dict.fromkeys(digests))  # unique, in order
        self.enabled = bool(self._digests)

    @classmethod
    def from_spec(cls, spec: AuthSpec) -> ApiKeys:
        """Keys from the env var ``spec.api_keys_env`` (comma-separated) and the digest file, if any."""
        digests = []
        plain = os.environ.get(spec.api_keys_env, "") if spec.api_keys_env else ""
        for key in plain.split(","):
            if key.strip():
                digests.append(hashlib.sha256(key.strip().encode()).digest())
        if spec.api_keys_file:
            digests.extend(read_digest_file(spec.api_keys_file))
        return cls(digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._digests)} keys)"

    def verify(self, authorization_header: str | None) -> str | None:
        """``Bearer <key>`` -> the key's id (first 12 hex of its SHA-256; not secret) when valid, else None."""
        if not authorization_header:
            return None
        scheme, _, key = authorization_header.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        digest = hashlib.sha256(key.encode()).digest()
        # Compare against every stored digest, without stopping at a match, so timing tells nothing.
        matched = False
        for stored in self._digests:
            matched |= hmac.compare_digest(digest, stored)
        return digest.hex()[:KEY_ID_LENGTH] if matched else None


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: ApiKeys) -> None:
    """Refuse to serve without API keys on anything but a loopback address."""
    if not keys.enabled and not is_loopback(host):
        raise ValueError(
            f"serve.host is {host!r} but no API key is configured: anyone who can reach it could use the model. "
            "Set the env var named by serve.auth.api_keys_env (default CHATFORGE_API_KEYS) or "
            "serve.auth.api_keys_file, or bind to 127.0.0.1"
        )
