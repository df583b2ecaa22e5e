"""Address policy: images are only fetched from public addresses (or ones a policy allows).

Three layers, because each one alone has a hole:

* :func:`check_url` refuses non-HTTP schemes and IP-literal hosts that are not allowed. aiohttp never
  calls a resolver for IP literals, so this check must run before every request, redirects included.
* :class:`GuardedResolver` filters what DNS returns, so a hostname can only ever be connected to an
  address that was checked: the answer that is checked is the answer that is used (no DNS rebinding).
* The fetcher follows redirects itself and runs :func:`check_url` on every hop.

>>> is_forbidden("169.254.169.254"), is_forbidden("93.184.216.34")
(True, False)
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from functools import lru_cache

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from viscon_hub.errors import redact
from viscon_hub.prepare.images.policy import FetchPolicy

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ranges Python's flags miss or classify as global although nothing public lives there.
_EXTRA_FORBIDDEN = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "192.0.0.0/24",
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "fc00::/7",
        "fec0::/10",  # deprecated site-local, still routed inside some networks
        "ff00::/8",
        "100::/64",  # discard-only
    )
)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class BlockedAddressError(OSError):
    """Every address a hostname resolved to is forbidden by the policy.

    An ``OSError`` so aiohttp wraps it like any resolver failure; the fetcher maps it to the drop
    reason ``blocked_address``.
    """

    def __init__(self, host: str, addresses: list[str]) -> None:
        super().__init__(f"{host} resolves only to forbidden addresses {sorted(set(addresses))}")
        self.host = host
        self.addresses = addresses


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a URL is not fetched: a drop reason and a short message free of credentials."""

    reason: str
    message: str


def _parse_ip(value: str | IPAddress) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    text = value.strip().strip("[]")
    return ipaddress.ip_address(text)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address tunnels to (mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_forbidden(ip: str | IPAddress) -> bool:
    """Whether ``ip`` is not a public unicast address (private, loopback, link-local, multicast, ...).

    IPv6 addresses that embed an IPv4 address (mapped ``::ffff:a.b.c.d``, 6to4, NAT64) are judged by
    the embedded address too. Text that is not an IP address counts as forbidden.

    >>> [is_forbidden(a) for a in ("10.0.0.1", "::ffff:127.0.0.1", "100.64.0.1", "8.8.8.8")]
    [True, True, True, False]
    """
    try:
        addr = _parse_ip(ip)
    except ValueError:
        return True
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            return True
        if addr.ipv4_mapped is not None:
            # A dual-stack socket connects a mapped address to the IPv4 one, so judge that alone.
            return is_forbidden(addr.ipv4_mapped)
        inner = _embedded_ipv4(addr)
        if inner is not None and is_forbidden(inner):
            return True
        if addr.is_site_local:
            return True
    return (
        not addr.is_global
        or addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
        or any(addr in net for net in _EXTRA_FORBIDDEN if net.version == addr.version)
    )


@lru_cache(maxsize=64)
def _networks(
    allowed: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(net, strict=False) for net in allowed)


def address_allowed(ip: str | IPAddress, *, policy: FetchPolicy) -> bool:
    """Whether the policy lets a connection go to ``ip``.

    >>> address_allowed("127.0.0.1", policy=FetchPolicy(allowed_networks=("127.0.0.1/32",)))
    True
    >>> address_allowed("127.0.0.2", policy=FetchPolicy(allowed_networks=("127.0.0.1/32",)))
    False
    """
    try:
        addr = _parse_ip(ip)
    except ValueError:
        return False
    if policy.allow_private or not is_forbidden(addr):
        return True
    candidates: list[IPAddress] = [addr]
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        candidates.append(addr.ipv4_mapped)
    nets = _networks(policy.allowed_networks)
    return any(c in net for c in candidates for net in nets if net.version == c.version)


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The address of a legacy numeric host such as ``2130706433`` or ``0x7f.1``, which libc accepts."""
    if not re.fullmatch(r"[0-9a-fA-FxX.]+", host) or not re.search(r"[0-9]", host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def check_url(url: str | URL, *, policy: FetchPolicy) -> tuple[URL | None, Refusal | None]:
    """Parse ``url`` and refuse it before any connection if its scheme or IP-literal host is not allowed.

    Hostnames pass here; they are checked after resolution by :class:`GuardedResolver`.

    >>> policy = FetchPolicy()
    >>> check_url("http://10.0.0.1/a.jpg", policy=policy)[1].reason
    'blocked_address'
    >>> check_url("ftp://example.org/a.jpg", policy=policy)[1].reason
    'invalid_url'
    >>> str(check_url("https://example.org/a.jpg", policy=policy)[0])
    'https://example.org/a.jpg'
    """
    shown = redact(url, limit=None)
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        scheme = parsed.scheme.lower()
        host = parsed.raw_host
        parsed.port  # noqa: B018 -- a bad port only raises when read
    except (TypeError, ValueError):
        return None, Refusal("invalid_url", f"cannot parse URL {shown!r}")
    if scheme not in ("http", "https"):
        return None, Refusal("invalid_url", f"scheme {scheme or '(none)'!r} is not http(s): {shown}")
    if not host:
        return None, Refusal("invalid_url", f"no host in URL {shown!r}")
    try:
        literal: IPAddress | None = _parse_ip(host)
    except ValueError:
        literal = _legacy_ipv4(host)
    if literal is not None and not address_allowed(literal, policy=policy):
        return None, Refusal("blocked_address", f"address {literal} is not public: {shown}")
    return parsed, None


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that drops every address the policy forbids.

    If nothing is left it raises :class:`BlockedAddressError`, so the connector never opens a socket
    to an unchecked address.

    >>> import asyncio, aiohttp
    >>> async def main():
    ...     resolver = GuardedResolver(policy=FetchPolicy())
    ...     async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver)):
    ...         pass
    >>> asyncio.run(main())
    """

    def __init__(self, *, policy: FetchPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        # ThreadedResolver binds the running loop, so it is created lazily inside that loop.
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = ThreadedResolver()
        results = await self._inner.resolve(host, port, family)
        kept = [r for r in results if address_allowed(r["host"], policy=self._policy)]
        if not kept:
            addresses = [r["host"] for r in results]
            logger.debug("refusing %s: resolves only to forbidden %s", host, addresses)
            raise BlockedAddressError(host, addresses)
        return kept

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()
