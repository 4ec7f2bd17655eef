"""Which image URLs a download may fetch, and the connections that enforce it.

A web dataset is untrusted input: a row whose URL names ``127.0.0.1``, ``10.0.0.5``,
``169.254.169.254`` (a cloud's metadata service) or ``localhost`` would make the
downloading machine fetch its own internal services. Two layers refuse them:

- **before fetching**, ``screen`` decides every row from its URL's host *as the HTTP client
  will connect to it*: percent-decoded (urllib decodes the host), IDNA-mapped (full-width
  ``１２７．０．０．１`` is ``127.0.0.1`` to the socket layer), lower-cased, trailing dots
  removed, and every numeric form the resolver accepts (``127.1``, ``0x7f.1``,
  ``2130706433``, IPv4 inside IPv6) read as the address it is. Refused rows get a reason
  (``private_address``; ``bad_url`` for what is not plain http(s)) and are never fetched.
  Host names are resolved (once per host, in threads) and refused when any address is private.
- **while fetching**, the download processes use ``opener``: every connection — the first
  one and each redirect hop — resolves its host, refuses private addresses and connects to
  the very address it checked (no second lookup a DNS answer could change in between).
  No proxy, no ``file:``/``ftp:``/``data:`` handlers. A refusal is a failed download whose
  error starts with ``REFUSED``, which the download's accounting reports as ``private_address``.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from functools import lru_cache
from typing import Callable

import polars as pl

from qvl.errors import QvlError

LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".lan", ".intranet")
RESOLVE_TIMEOUT_S = 10.0
REFUSED = "refused by qvl's address screen"
# IPv6 prefixes that carry an IPv4 address in their low 32 bits (NAT64, IPv4-compatible)
_V4_IN_V6 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"),
             ipaddress.ip_network("::/96"))



class Refused(QvlError, OSError):
    """A connection the screen does not allow; the message says why."""


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _V4_IN_V6) and int(ip) > 1:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def private_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Not a public unicast address: private, loopback, link-local, shared, reserved,
    multicast — also when wrapped in IPv6 (mapped, 6to4, Teredo, NAT64, compatible)."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None and private_address(inner):
            return True
    return not ip.is_global or ip.is_multicast


def literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a numeric host denotes to the resolver, or None for a name. IPv4 takes
    every form ``inet_aton`` reads (``127.1``, ``0x7f.0.0.1``, ``0177.0.0.1``, ``2130706433``)."""
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone index is not part of it
    except ValueError:
        pass
    if not host or not (host[0].isdigit()):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def private_ip(text: str) -> bool | None:
    """True/False for an IP literal, None when ``text`` is a name."""
    ip = literal_ip(text)
    return None if ip is None else private_address(ip)


def host_of(url: str) -> str | None:
    """The host a client connects to for ``url`` (normalised as above), None when ``url`` is
    not http(s) with a host, or its host cannot be encoded (the client would fail too)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    netloc = rest
    for stop in "/?#\\":
        netloc = netloc.split(stop, 1)[0]
    netloc = urllib.parse.unquote(netloc)  # what urllib.request does with the host
    netloc = netloc.rpartition("@")[2]  # userinfo: other clients drop it and connect to the rest
    if netloc.startswith("["):
        host = netloc[:netloc.find("]") + 1] if "]" in netloc else netloc
    else:
        host = netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc
    if not host or any(c.isspace() or ord(c) < 32 for c in host):
        return None
    if host.startswith("["):
        return host.lower()
    try:
        host = host.encode("idna").decode("ascii")  # as the socket layer encodes a name
    except UnicodeError:
        return None
    return host.rstrip(".").lower() or None


def _local_name(host: str) -> bool:
    return host == "localhost" or host.endswith(LOCAL_SUFFIXES) or "." not in host


def _resolve(host: str) -> list[str]:
    return [info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)]


@lru_cache(maxsize=1 << 16)
def _resolves_private(host: str) -> bool:
    try:
        return any(private_ip(a) for a in _resolve(host))
    except (OSError, UnicodeError):
        return False  # unresolvable: the download fails and says so


def verdict(host: str | None) -> str | None:
    """Why ``host`` (from ``host_of``) may not be fetched, without resolving it; None: may be."""
    if host is None:
        return "no host"
    literal = private_ip(host)
    if literal is not None:
        return "private, loopback or link-local address" if literal else None
    if _local_name(host):
        return "local host name"
    return None


def host_verdicts(hosts: list[str], resolve: bool = True) -> dict[str, str | None]:
    """host -> None (may be fetched) or why not."""
    verdicts = {host: verdict(host) for host in hosts}
    names = [h for h, why in verdicts.items() if why is None and private_ip(h) is None]
    if resolve and names:
        with ThreadPoolExecutor(16, thread_name_prefix="qvl-resolve") as pool:
            futures = {pool.submit(_resolves_private, h): h for h in names}
            done, _ = wait(futures, timeout=RESOLVE_TIMEOUT_S)
            for future in done:
                if future.result():
                    verdicts[futures[future]] = "host name resolves to a private address"
            pool.shutdown(wait=False, cancel_futures=True)
    return verdicts


def screen(frame: pl.DataFrame, allow_private: bool, resolve: bool = True) -> pl.DataFrame:
    """Add ``_refused`` (``bad_url`` / ``private_address`` / null) and ``_refused_why``."""
    urls = frame.get_column("url").unique().drop_nulls().to_list()
    host = {u: host_of(u) for u in urls}
    frame = frame.with_columns(_host=pl.col("url").replace_strict(host, default=None, return_dtype=pl.String))
    hosts = frame.get_column("_host").drop_nulls().unique().to_list()
    verdicts = {} if allow_private else host_verdicts(hosts, resolve)
    why = pl.col("_host").replace_strict(verdicts, default=None, return_dtype=pl.String)
    return frame.with_columns(
        _refused=pl.when(pl.col("_host").is_null()).then(pl.lit("bad_url"))
        .when(why.is_not_null()).then(pl.lit("private_address")),
        _refused_why=pl.when(pl.col("_host").is_null()).then(pl.lit("not an http(s) URL with a host"))
        .otherwise(why),
    ).drop("_host")


# ---------------------------------------------------------------- while fetching


class Screen:
    """Decides connections. ``resolve`` (name -> addresses) and ``is_private`` (address ->
    bool) are injectable so a test can call a loopback server public."""

    def __init__(self, resolve: Callable[[str], list[str]] = _resolve,
                 is_private: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool] = private_address):
        self.resolve, self.is_private = resolve, is_private

    def addresses(self, host: str) -> list[str]:
        """The addresses to connect to for ``host`` (as http.client passes it), all checked."""
        name = host.strip("[]").rstrip(".").lower()
        if literal_ip(name) is None:
            name = name.encode("idna").decode("ascii")  # as getaddrinfo would see it
        literal = literal_ip(name)
        if literal is None and _local_name(name):
            raise Refused(f"{REFUSED}: {host} is a local host name")
        found = [str(literal)] if literal is not None else self.resolve(name)
        bad = [a for a in found if self.is_private(ipaddress.ip_address(a.split("%", 1)[0]))]
        if bad:
            raise Refused(f"{REFUSED}: {host} is or resolves to a private address ({bad[0]})")
        if not found:
            raise OSError(f"{host}: no address")
        return found

    def create_connection(self, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **kwargs):
        host, port = address
        error: OSError | None = None
        for ip in self.addresses(host):  # pinned: connect to what was checked
            try:
                return socket.create_connection((ip, port), timeout, source_address)
            except OSError as e:
                error = e
        raise error  # type: ignore[misc]


def opener(screen: Screen | None = None) -> urllib.request.OpenerDirector:
    """An urllib opener that only speaks http(s), uses no proxy, and sends every
    connection (redirect hops included) through ``screen``."""
    screen = screen or Screen()

    class HTTPConnection(http.client.HTTPConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = screen.create_connection

    class HTTPSConnection(http.client.HTTPSConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = screen.create_connection

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(HTTPConnection, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(HTTPSConnection, req, context=self._context)

    class RedirectHandler(urllib.request.HTTPRedirectHandler):
        """Hops to http(s) only; each hop's connection goes through the screen again."""

        def http_error_302(self, req, fp, code, msg, headers):
            target = headers.get("location") or headers.get("uri")
            if target and host_of(urllib.parse.urljoin(req.full_url, target)) is None:
                raise urllib.error.HTTPError(req.full_url, code, f"{REFUSED}: redirect to {target!r}", headers, fp)
            return super().http_error_302(req, fp, code, msg, headers)

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    director = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler({}), HTTPHandler(), HTTPSHandler(), RedirectHandler(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
                    urllib.request.UnknownHandler()):
        director.add_handler(handler)
    return director
