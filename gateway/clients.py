"""Who sent a request, and how many requests each client has in the app at once.

One client is an address, an IPv6 /64, or behind a proxy in ``trusted_proxies`` the
address it forwards; it has at most ``client_max_requests`` requests in the app at once
(``ClientGate``), and the admin token's throttle counts the same clients.
"""

from __future__ import annotations

import ipaddress
import threading
from collections import Counter

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """``trusted_proxies``: addresses or CIDR networks, comma-separated (checked by Settings)."""
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in text.split(",") if p.strip())


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(address: str, networks: tuple[Network, ...]) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


def peer_key(address: str) -> str:
    """One client for the per-client bounds: its address, an IPv6 one by its /64."""
    ip = _ip(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def client_address(remote: str, forwarded: str | None, trusted: tuple[Network, ...]) -> str:
    """Who sent a request: the peer, or, when the peer is a trusted proxy, the
    right-most address in X-Forwarded-For that is not a trusted proxy (the ones left of
    it are whatever the client claimed)."""
    if not forwarded or not in_networks(remote, trusted):
        return remote
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        if in_networks(hop, trusted):
            continue
        return hop if _ip(hop) is not None else remote
    return remote


class ClientGate:
    """At most ``limit`` requests in the app at once per client key."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()

    def enter(self, key: str) -> bool:
        with self._lock:
            if self._held[key] >= self.limit:
                return False
            self._held[key] += 1
            return True

    def leave(self, key: str) -> None:
        with self._lock:
            self._held[key] -= 1
            if self._held[key] <= 0:
                del self._held[key]

    def held(self) -> int:
        with self._lock:
            return sum(self._held.values())
