"""What a web page could send to the gateway, refused: foreign `Host` names and non-JSON POST bodies.

Without API keys (the default) anything that can reach the port can use it, and a browser can reach a
loopback port for any page it shows (issue 19 item 16):

- A page may POST to any URL without asking first when the body is a "simple" one (`text/plain`, a form).
  The completion endpoints read any body as JSON, so such a POST used to run a completion. A POST must
  now say `Content-Type: application/json` (charset, if given, UTF-8), which a page cannot send to another
  origin without a CORS preflight, and the gateway answers no preflight unless `SPECGATE_CORS_ORIGINS`
  allows the origin. Anything else is 415.
- DNS rebinding: a page on `evil.example` re-points its own name at 127.0.0.1 and then reads the gateway
  as same-origin (`/v1`, `/logs`, `/status.json`). Its requests carry `Host: evil.example`, so the
  gateway answers only Host names that belong to where it listens (`allowed_hosts`), else 421.
  A request without a Host header (HTTP/1.0 tools) passes: every browser sends one.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from starlette.types import Scope

from app.errors import InvalidRequest

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class HostNotAllowed(InvalidRequest):
    status_code = 421
    code = "host_not_allowed"


class UnsupportedMediaType(InvalidRequest):
    status_code = 415
    code = "unsupported_media_type"


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def host_name(header: str) -> str:
    """The name in a Host header, lower case, without port, brackets or a final dot."""
    value = header.strip().lower()
    if value.startswith("["):  # [v6]:port
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


class HostPolicy:
    """Which Host names the gateway answers: those of the address it is bound to, plus `extra`.

    Bound to loopback: loopback names and addresses. Bound to one other address: that address and the
    loopback ones. Bound to every interface (0.0.0.0, ::): any IP address (a rebinding page has a name, not
    an address), `localhost` and this machine's names. `extra` adds names (`*.example.com` for a domain
    and its subdomains); `*` turns the check off.
    """

    def __init__(self, bound: str, extra: Iterable[str] = ()) -> None:
        self.any = False
        self.any_ip = False
        self.names: set[str] = set(LOOPBACK_NAMES)
        self.suffixes: list[str] = []
        bound = host_name(bound)
        address = _ip(bound)
        if bound in _WILDCARDS:
            self.any_ip = True
            self.names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        elif address is None:
            self.names.add(bound)  # bound by name (`--host myhost`): that name
        else:
            self.names.add(str(address))
        for item in extra:
            item = item.strip().lower()
            if item == "*":
                self.any = True
            elif item.startswith("*."):
                self.suffixes.append(item[1:])
            elif item:
                self.names.add(host_name(item))

    def allows(self, name: str) -> bool:
        if self.any or name in self.names:
            return True
        address = _ip(name)
        if address is not None:
            return self.any_ip or address.is_loopback
        return any(name.endswith(suffix) for suffix in self.suffixes)


def _header_values(scope: Scope, wanted: bytes) -> list[bytes]:
    return [value for name, value in scope["headers"] if name == wanted]


def _is_utf8_json(content_type: bytes) -> bool:
    media_type, *params = content_type.decode("latin-1").split(";")
    if media_type.strip().lower() != "application/json":
        return False
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


class BrowserGuard:
    """The two checks, as one `refusal(scope)` for the edge (app/edge.py)."""

    def __init__(self, hosts: HostPolicy) -> None:
        self.hosts = hosts

    def refusal(self, scope: Scope) -> InvalidRequest | None:
        hosts = _header_values(scope, b"host")
        if hosts:
            name = host_name(hosts[0].decode("latin-1"))
            if len(hosts) > 1 or not self.hosts.allows(name):
                return HostNotAllowed(
                    f"this gateway does not answer to the host name {name!r}; add it to SPECGATE_ALLOWED_HOSTS "
                    "if it is one of this machine's names"
                )
        if scope["method"] in _BODY_METHODS:
            types = _header_values(scope, b"content-type")
            if len(types) != 1 or not _is_utf8_json(types[0]):
                given = types[0].decode("latin-1")[:100] if types else "none"
                return UnsupportedMediaType(
                    f"the request body must be JSON in UTF-8, sent with 'Content-Type: application/json' "
                    f"(got {given!r})"
                )
        return None
