"""API keys for the OpenAI-compatible API: ``Authorization: Bearer <key>``, checked in constant time.

Keys come from an env var of comma-separated keys (a Kubernetes secret mounted as env) and/or a file of their
SHA-256 hex digests, one per line, so the file holds nothing that can be replayed. They are read once, where
``build_app`` runs, and only their digests travel to the ingress replicas (as constructor arguments), so every
replica on every node checks the same keys whatever its own environment. A request's key is compared by digest
against every stored digest with ``hmac.compare_digest``. Ray's own token auth does not cover Serve's HTTP data
plane, so this is the API's only gate: without keys the API starts only when the spec asks for anonymous access
and Serve binds a loopback address, and then answers only loopback clients.
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
    def from_hex(cls, digests: list[str]) -> ApiKeys:
        """Keys from SHA-256 hex digests (what ``hex_digests`` gives): how the ingress receives them."""
        if not all(_HEX_DIGEST.match(d) for d in digests):
            raise ValueError("API key digests must be SHA-256 hex digests (64 hex characters)")
        return cls([bytes.fromhex(d) for d in digests])

    def hex_digests(self) -> list[str]:
        return [digest.hex() for digest in self._digests]

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


def check_access(keys: ApiKeys, anonymous: bool, host: str | None) -> None:
    """Refuse to start without API keys, unless ``anonymous`` and Serve binds a known loopback ``host``.

    ``host`` None means the bind address could not be told, which is refused like a public one."""
    if keys.enabled:
        return
    if not anonymous:
        raise ValueError(
            "no API key is configured: set the env var named by serve.auth.api_keys_env (default "
            "CHATFORGE_API_KEYS) or serve.auth.api_keys_file where the app is built; to serve without keys on a "
            "loopback address only (127.0.0.1), set serve.auth.anonymous: true"
        )
    if host is None:
        raise ValueError(
            "serve.auth.anonymous is set but Serve's HTTP bind address cannot be told, and without keys it must "
            "be a loopback one: start Serve first (e.g. serve.start(http_options={'host': '127.0.0.1'})) or "
            "configure API keys (serve.auth.api_keys_env or api_keys_file)"
        )
    if not is_loopback(host):
        raise ValueError(
            f"Serve's HTTP proxy binds {host!r} but no API key is configured: anyone who can reach it could use "
            "the model. serve.auth.anonymous is allowed only on a loopback address: set the env var named by "
            "serve.auth.api_keys_env (default CHATFORGE_API_KEYS) or serve.auth.api_keys_file, or bind to 127.0.0.1"
        )


def is_local_client(client_host: str | None) -> bool:
    """Whether a request came from this machine: what anonymous access is limited to, whatever Serve binds."""
    return client_host is not None and is_loopback(client_host)
