"""What the crawler may connect to: by default only public addresses (no loopback, link-local such as cloud
metadata at 169.254.169.254, private, shared, reserved or multicast ones), checked on the address each connection
is opened to, for the first request and every redirect alike: the host is resolved once, at connect time, and the
socket is opened to the address that was checked, so a DNS answer that changes between a check and the connect
cannot get through. `--allow-private`, or `--allow-cidr` networks, opt in."""
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Sequence, Tuple

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection


class BlockedAddress(ValueError):
    """A connection refused before it was opened: the host resolved only to addresses the policy does not allow.
    (Not an OSError: urllib3 and requests pass it on as it is, unretried.)"""

    def __init__(self, host: str, address: str, why: str):
        super().__init__(f"{host} resolves to {address} ({why}): not fetched (--allow-private or --allow-cidr "
                         f"opt in)")
        self.host, self.address, self.why = host, address, why


def non_public(ip) -> str:
    """Why an address is not public ('' if it is); an IPv4-mapped IPv6 address is judged as its IPv4 one."""
    ip = getattr(ip, "ipv4_mapped", None) or ip
    for test, why in (("is_loopback", "loopback"), ("is_link_local", "link-local"), ("is_multicast", "multicast"),
                      ("is_unspecified", "unspecified"), ("is_reserved", "reserved"), ("is_private", "private")):
        if getattr(ip, test):
            return why
    return "" if ip.is_global else "not globally routable"


@dataclass(frozen=True)
class AddressPolicy:
    allow_private: bool = False             # every address allowed
    allow: Tuple = field(default=())        # networks allowed beside the public addresses

    @classmethod
    def from_args(cls, allow_private: bool = False, cidrs: Sequence[str] = ()) -> "AddressPolicy":
        networks = []
        for c in cidrs:
            try:
                networks.append(ipaddress.ip_network(c, strict=False))
            except ValueError:
                raise ValueError(f"--allow-cidr {c!r} is not a network (e.g. 10.0.0.0/8 or 127.0.0.1/32)") from None
        return cls(allow_private, tuple(networks))

    def refusal(self, address: str) -> str:
        """Why a connection to `address` is refused ('' if it is allowed)."""
        if self.allow_private:
            return ""
        ip = ipaddress.ip_address(address.split("%")[0])
        if any(ip.version == n.version and ip in n for n in self.allow):
            return ""
        return non_public(ip)


def guarded_connection(base, policy: AddressPolicy):
    """A urllib3 connection class that resolves its host once, keeps the addresses the policy allows and opens the
    socket to one of those very addresses (urllib3's own _new_conn would resolve again)."""
    class Guarded(base):
        def _new_conn(self) -> socket.socket:
            try:
                infos = socket.getaddrinfo(self._dns_host, self.port, type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                raise NameResolutionError(self.host, self, e) from e
            addresses = list(dict.fromkeys(info[4][0] for info in infos))
            allowed = [a for a in addresses if not policy.refusal(a)]
            if not allowed:
                raise BlockedAddress(self._dns_host, addresses[0], policy.refusal(addresses[0]))
            last = None
            for address in allowed:
                try:
                    return connection.create_connection((address, self.port), self.timeout,
                                                        source_address=self.source_address,
                                                        socket_options=self.socket_options)
                except socket.timeout as e:
                    raise ConnectTimeoutError(self, f"Connection to {self.host} timed out. (connect timeout="
                                                    f"{self.timeout})") from e
                except OSError as e:
                    last = e
            raise NewConnectionError(self, f"Failed to establish a new connection: {last}") from last
    return Guarded


class GuardedAdapter(HTTPAdapter):
    """requests' adapter whose connection pools open every connection through the policy."""

    def __init__(self, policy: AddressPolicy, **kwargs):
        self.policy = policy
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        for scheme, pool, conn in (("http", HTTPConnectionPool, HTTPConnection),
                                   ("https", HTTPSConnectionPool, HTTPSConnection)):
            self.poolmanager.pool_classes_by_scheme[scheme] = type(
                f"Guarded{pool.__name__}", (pool,), {"ConnectionCls": guarded_connection(conn, self.policy)})


def guarded_session(policy: AddressPolicy, max_redirects: int) -> requests.Session:
    """A session that connects only where `policy` allows, and directly: proxy variables are ignored, since the
    address checked must be the one connected to."""
    session = requests.Session()
    session.trust_env = False
    session.max_redirects = max_redirects
    for prefix in ("http://", "https://"):
        session.mount(prefix, GuardedAdapter(policy))
    return session
