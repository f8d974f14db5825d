"""Access control, the pure parts: password hashes, the viewer token file, Host and Origin checks.

No I/O but the token file; the HTTP side (which request needs what, 401
and 403 responses, cookies) is ``signalling.access``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Collection
from pathlib import Path

log = logging.getLogger(__name__)

# scrypt with 16 MiB of memory: about 50 ms on a Pi 5, and as dear for anyone guessing.
HASH_SCHEME = "scrypt"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MAX_SCRYPT_N = 2**20  # 1 GiB at r=8: above this a hash is a way to make the relay run out of memory
SALT_BYTES = 16
KEY_BYTES = 32
TOKEN_BYTES = 32  # secrets.token_urlsafe(32): 43 characters, 256 bits
TOKEN_FILE = "viewer-token"
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,}")  # what a token may look like (URL-safe, no escaping needed)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
HASH_HELP = "make one with `camrelay hash-password`"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$key``: self-describing, so the cost can be raised later without breaking old hashes."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"{HASH_SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * n * r * p + 2**20, dklen=KEY_BYTES
    )


def parse_hash(text: str) -> tuple[int, int, int, bytes, bytes]:
    """``(N, r, p, salt, key)`` of a hash from ``hash_password``; ``ValueError`` says what is wrong.

    The messages never quote the text: a password pasted where its hash belongs must not reach a log.
    """
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != HASH_SCHEME:
        raise ValueError(f"is not a password hash (scrypt$N$r$p$salt$key); {HASH_HELP}")
    try:
        n, r, p = (int(x) for x in parts[1:4])
    except ValueError:
        raise ValueError(f"has scrypt parameters that are not whole numbers; {HASH_HELP}") from None
    if not (1 < n <= MAX_SCRYPT_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        raise ValueError(f"has scrypt parameters out of range (N a power of 2 up to {MAX_SCRYPT_N}, r 1..32, p 1..16)")
    try:
        salt, key = _unb64(parts[4]), _unb64(parts[5])
    except (binascii.Error, ValueError):
        raise ValueError(f"has a salt or key that is not base64; {HASH_HELP}") from None
    if len(salt) < SALT_BYTES or len(key) < KEY_BYTES:
        raise ValueError(f"has a salt or key that is too short; {HASH_HELP}")
    return n, r, p, salt, key


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches the hash, compared in constant time. Takes as long as one scrypt."""
    n, r, p, salt, key = parse_hash(encoded)
    return hmac.compare_digest(_scrypt(password, salt, n, r, p)[: len(key)], key)


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600), whole or not at all: a temporary file, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def load_or_create_token(state_dir: Path) -> str:
    """The viewer token kept in ``state_dir``; made (and kept, 0600) on first use."""
    path = state_dir / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if TOKEN_PATTERN.fullmatch(token):
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
            log.warning("%s was readable by other users; made it 0600", path)
        return token
    if token:
        log.warning("%s does not hold a valid token; writing a new one", path)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    write_private(path, token + "\n")
    log.info("new viewer token written to %s", path)
    return token


def split_host(value: str) -> tuple[str, str] | None:
    """``Host`` or an origin's authority -> (name, port), the name lower-case, no trailing dot; None: malformed."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:/\s@]+)(?::([0-9]{1,5}))?", value)
    if not m:
        return None
    name = m.group(1).lower().rstrip(".")
    return (name[1:-1] if name.startswith("[") else name), m.group(2) or ""


def check_host(host: str | None, allowed: Collection[str]) -> str | None:
    """Why a request with this ``Host`` header is refused (DNS rebinding), or None when it is one of ours."""
    if "*" in allowed:
        return None
    if not host:
        return "the request has no Host header"
    parts = split_host(host)
    if parts is None:
        return f"Host header {host[:100]!r} is not a host name or address"
    if parts[0] in allowed:
        return None
    return f"Host {parts[0][:100]!r} is not a name of this relay; add it to http.allowed_hosts"


DEFAULT_PORTS = {"http": "80", "https": "443"}


def check_origin(origin: str | None, host: str | None, allowed_origins: Collection[str]) -> str | None:
    """Why a state-changing request from a browser page at ``origin`` is refused, or None.

    No ``Origin``: not a browser (ffmpeg, an NVR, aiortc), allowed. Otherwise the
    page must be camrelay's own (same host and port as ``Host``) or configured in
    ``http.cors_origins``. A reverse proxy that ends TLS keeps the host name, so
    the scheme is not compared, only host and port (a missing port is the scheme's).
    """
    if origin is None:
        return None
    if origin in allowed_origins or "*" in allowed_origins:
        return None
    scheme, sep, authority = origin.partition("://")
    theirs = split_host(authority) if sep and scheme in DEFAULT_PORTS else None
    ours = split_host(host or "")
    if theirs is not None and ours is not None:
        their_port = theirs[1] or DEFAULT_PORTS[scheme]
        if theirs[0] == ours[0] and (their_port == ours[1] or (not ours[1] and their_port in DEFAULT_PORTS.values())):
            return None
    return f"cross-site request from Origin {origin[:100]!r} refused; allow it in http.cors_origins"
