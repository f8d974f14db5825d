"""Who may use the relay over HTTP: the viewer token or a password, and Host/Origin checks.

``guard`` is an aiohttp middleware. For every request, in this order:

1. ``Host`` must be one of this relay's names (DNS rebinding), else 403.
2. WHEP POST/PATCH/DELETE from a browser page (``Origin`` present) must come
   from camrelay's own pages or ``http.cors_origins``, else 403.
3. ``OPTIONS`` is answered without credentials (a CORS preflight never carries
   any); credentials it does carry are checked (401 when wrong) and make it a
   viewer's (``VIEWER``), which is told the ICE servers. One that asks for them
   (``ICE_SERVERS_HEADER``, camrelay's page) gets 401 without credentials: a
   browser sends its password only to a path that has challenged it.
4. Unless the request is open (``/static/``, ``/healthz`` and ``/metrics`` as
   configured, ``PATCH`` and ``DELETE`` of a WHEP session, whose URL with its
   unguessable id is the capability, as in mediamtx) or ``auth.mode = "none"``:
   the viewer token (``?token=``, ``Authorization: Bearer``, or the cookie
   ``?token=`` sets) or HTTP Basic, else 401.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import random
import secrets
import socket
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from relay.auth import LOOPBACK_NAMES, check_host, check_origin, load_or_create_token, verify_password
from relay.config import Config, ConfigError
from relay.logsafe import SECRET_FILTER, Throttled
from relay.service import host_addresses

from .limits import RateLimiter

log = logging.getLogger(__name__)

FAILURE_DELAY = (0.05, 0.15)  # seconds, random in this range, before answering wrong credentials
COOKIE_MAX_AGE = 400 * 86400  # seconds a browser keeps the token cookie: the longest Chromium allows
HOSTS_REFRESH = 5.0  # seconds: this machine's addresses are looked up again at most this often (DHCP changes them)
VERIFIED_CACHE = 32  # Basic credentials remembered as good, so a page's requests cost one scrypt, not one each
# One scrypt at a time, relay-wide: a flood of logins from any number of
# addresses costs at most one core, and the event loop keeps the other(s).
# On a thread of its own: the event loop's default executor may be full of
# DNS lookups that a dead DNS server holds (aioice looks the STUN and TURN
# servers' names up there, for each viewer), and no login must wait for them.
MAX_CONCURRENT_VERIFY = 1
# Password guesses per client address: a burst (typos, a page's retries), then
# one every few seconds; past that 429 without any scrypt. A guess reserves
# its token before the scrypt and a right password gives it back, so a burst
# of parallel requests cannot run more scrypts than the burst allows.
AUTH_FAILURE_BURST = 20
AUTH_FAILURE_RATE = 1 / 3  # guesses a second per address, after the burst
REALM = "camrelay"
STATE_CHANGING = ("POST", "PATCH", "DELETE")
SESSION_METHODS = ("PATCH", "DELETE")  # what a WHEP session URL takes without credentials
# camrelay's page marks its OPTIONS with this header (static/whep.js): it wants the ICE servers, so without
# credentials it is not a CORS preflight but a viewer whose browser has not sent the password (Chromium sends
# cached Basic credentials to a path only after a 401 there), and gets the challenge.
ICE_SERVERS_HEADER = "X-Camrelay-Ice-Servers"
NO_TOKEN = "no viewer token"
WRONG_TOKEN = "wrong viewer token"
THROTTLED = "too many wrong passwords from {address}; retry later"
NO_PASSWORD = "user name and password required"
WRONG_PASSWORD = "wrong user name or password"
MALFORMED_BASIC = "malformed Basic credentials"
BAD_CREDENTIALS = (WRONG_TOKEN, WRONG_PASSWORD, MALFORMED_BASIC)  # answered after FAILURE_DELAY
TOKEN_PAGE = """<!doctype html>
<meta charset="utf-8"><title>camrelay: viewer token needed</title>
<h1>401: this relay needs its viewer token</h1>
<p>{reason}</p>
<p>Open the address camrelay printed when it started, the one ending in <code>?token=&hellip;</code>.
It is in camrelay's log (<code>journalctl -u camrelay | grep "viewer page"</code> for the service),
and the token alone is in the file <code>viewer-token</code> in its state directory.</p>
"""


class HostNames:
    """The names a request may be addressed to: configured ones, this machine's, loopback."""

    def __init__(self, configured: tuple[str, ...], bind: str) -> None:
        self.fixed = {*configured, *LOOPBACK_NAMES}
        if bind not in ("", "0.0.0.0", "::"):
            self.fixed.add(bind.lower())
        hostname = socket.gethostname().lower()
        self.fixed |= {hostname, f"{hostname}.local"}
        self.names: frozenset[str] = frozenset()
        self._looked = float("-inf")
        self.refresh()

    def refresh(self) -> None:
        self.names = frozenset(self.fixed | {a.lower() for a in host_addresses()})
        self._looked = time.monotonic()

    def check(self, host: str | None) -> str | None:
        reason = check_host(host, self.names)
        if reason and time.monotonic() - self._looked > HOSTS_REFRESH:
            self.refresh()  # an address this machine got since we last looked
            reason = check_host(host, self.names)
        return reason


class Access:
    """The relay's access rules, from ``[auth]`` and ``[http]``; ``guard`` applies them."""

    def __init__(self, config: Config, state_dir: Path) -> None:
        a = config.auth
        self.mode = a.mode
        self.user = a.user
        self.password_hash = a.password_hash
        self.protect_metrics = a.protect_metrics
        self.protect_healthz = a.protect_healthz
        self.cors_origins = config.http.cors_origins
        self.hosts = HostNames(config.http.allowed_hosts, config.http.host)
        # Cookies are per host, not per port: two relays on one machine keep theirs apart by name.
        self.cookie = f"camrelay_token_{config.http.port}"
        self.token = ""
        if self.mode == "token" and not a.token:
            try:
                self.token = load_or_create_token(state_dir)
            except OSError as exc:
                raise ConfigError(f"state_dir: cannot keep the viewer token in {state_dir}: {exc.strerror}") from None
        elif self.mode == "token":
            self.token = a.token
        SECRET_FILTER.secrets.update(s for s in (self.token, self.password_hash) if s)
        self._cache_key = secrets.token_bytes(32)
        self.throttled = Throttled(log)
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._verifying = asyncio.Semaphore(MAX_CONCURRENT_VERIFY)
        self._scrypt = ThreadPoolExecutor(MAX_CONCURRENT_VERIFY, thread_name_prefix="camrelay-scrypt")
        self._guesses = RateLimiter(AUTH_FAILURE_RATE, AUTH_FAILURE_BURST)  # per client address
        self._checking: dict[bytes, asyncio.Future[bool]] = {}  # Basic headers being verified now
        self._checking_from: set[str] = set()  # addresses with a verification running

    def close(self) -> None:
        self._scrypt.shutdown(wait=False, cancel_futures=True)

    def is_open(self, request: web.Request) -> bool:
        if self.mode == "none":
            return True
        path = request.path
        if request.method in SESSION_METHODS and path.startswith("/whep/") and "session" in request.match_info:
            return True  # the session URL is the capability: a player may send its token with the POST only
        if path.startswith("/static/"):
            return True
        if path == "/healthz":
            return not self.protect_healthz
        if path == "/metrics":
            return not self.protect_metrics
        return False

    async def is_viewer(self, request: web.Request) -> bool:
        """Whether an ``OPTIONS`` request is a viewer's: False without credentials, 401 when they are wrong or
        when one that asks for the ICE servers has none."""
        if self.mode == "none":
            return True
        reason, _ = await self.authenticate(request)
        if reason in (NO_TOKEN, NO_PASSWORD) and ICE_SERVERS_HEADER not in request.headers:
            return False
        if reason:
            raise self.unauthorized(request, reason)
        return True

    async def authenticate(self, request: web.Request) -> tuple[str | None, bool]:
        """(why the request is refused or None, whether to set the token cookie)."""
        if self.mode == "token":
            reason, set_cookie = self._check_token(request)
        else:
            header = request.headers.get("Authorization", "")
            reason, set_cookie = await self._check_basic(header, request.remote or "?"), False
        if reason in BAD_CREDENTIALS:
            await asyncio.sleep(random.uniform(*FAILURE_DELAY))  # blurs what the failure's timing could tell
        return reason, set_cookie

    def _check_token(self, request: web.Request) -> tuple[str | None, bool]:
        query = request.query.get("token")
        scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
        presented = [
            (query, True),
            (bearer.strip() if scheme.lower() == "bearer" else None, False),
            (request.cookies.get(self.cookie), False),
        ]
        expected = self.token.encode()
        tried = False
        for value, from_query in presented:
            if value is None:
                continue
            tried = True
            if hmac.compare_digest(value.encode("utf-8", "surrogateescape"), expected):  # headers may hold any byte
                return None, from_query
        return (WRONG_TOKEN if tried else NO_TOKEN), False

    async def _check_basic(self, header: str, address: str) -> str | None:
        """Why Basic credentials are refused, or None; raises 429 for an address guessing too fast."""
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return NO_PASSWORD
        cache_key = hmac.digest(self._cache_key, header.encode(errors="replace"), hashlib.sha256)
        if cache_key in self._verified:
            self._verified.move_to_end(cache_key)
            return None
        try:
            user, colon, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return MALFORMED_BASIC
        if not colon:
            return MALFORMED_BASIC
        if cache_key in self._checking:  # a page's parallel requests with one new header: one scrypt for all
            return None if await asyncio.shield(self._checking[cache_key]) else WRONG_PASSWORD
        wait = 0.0 if address not in self._checking_from else 1.0  # one guess at a time per address
        wait = wait or self._guesses.check(address, time.monotonic())
        if wait:
            self.throttled.warn("auth: too many password guesses from %s; answering 429", address)
            raise web.HTTPTooManyRequests(
                text=f"429: {THROTTLED.format(address=address)}\n",
                content_type="text/plain",
                headers={"Retry-After": str(max(1, round(wait)))},
            )
        result: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._checking[cache_key] = result
        self._checking_from.add(address)
        try:
            async with self._verifying:  # scrypt on a thread: the event loop keeps serving video meanwhile
                good_password = await asyncio.get_running_loop().run_in_executor(
                    self._scrypt, verify_password, password, self.password_hash
                )
            good = hmac.compare_digest(user.encode(), self.user.encode()) and good_password
            result.set_result(good)
        finally:
            if not result.done():
                result.set_result(False)
            del self._checking[cache_key]
            self._checking_from.discard(address)
        if not good:
            return WRONG_PASSWORD
        self._guesses.refund(address)  # a right password is not a guess
        self._verified[cache_key] = None
        if len(self._verified) > VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return None

    def unauthorized(self, request: web.Request, reason: str) -> web.HTTPUnauthorized:
        if self.mode == "password":
            challenge = f'Basic realm="{REALM}", charset="UTF-8"'
        else:
            challenge = f'Bearer realm="{REALM}"'
        headers = {"WWW-Authenticate": challenge, "Cache-Control": "no-store"}
        if self.mode == "token" and "text/html" in request.headers.get("Accept", ""):
            return web.HTTPUnauthorized(
                text=TOKEN_PAGE.format(reason=f"401: {reason}."), content_type="text/html", headers=headers
            )
        return web.HTTPUnauthorized(text=f"401: {reason}\n", content_type="text/plain", headers=headers)

    def set_cookie(self, request: web.Request, response: web.StreamResponse) -> None:
        response.set_cookie(
            self.cookie,
            self.token,
            max_age=COOKIE_MAX_AGE,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.secure or None,
        )


ACCESS = web.AppKey("access", Access)
VIEWER = web.RequestKey("viewer", bool)  # an OPTIONS request that carried a viewer's credentials


def _forbidden(reason: str) -> web.HTTPForbidden:
    return web.HTTPForbidden(text=f"403: {reason}\n", content_type="text/plain")


@web.middleware
async def guard(request: web.Request, handler):
    access = request.app[ACCESS]
    reason = access.hosts.check(request.headers.get("Host"))
    if reason:
        raise _forbidden(reason)
    if request.method in STATE_CHANGING and request.path.startswith("/whep/"):
        reason = check_origin(request.headers.get("Origin"), request.headers.get("Host"), access.cors_origins)
        if reason:
            raise _forbidden(reason)
    if request.method == "OPTIONS":
        request[VIEWER] = await access.is_viewer(request)
        return await handler(request)
    if access.is_open(request):
        return await handler(request)
    reason, set_cookie = await access.authenticate(request)
    if reason:
        raise access.unauthorized(request, reason)
    response = await handler(request)
    if set_cookie and not response.prepared:
        access.set_cookie(request, response)
    return response
