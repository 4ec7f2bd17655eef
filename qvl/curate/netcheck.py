"""Which image URLs a download may fetch.

A web dataset is untrusted input: a row whose URL names ``127.0.0.1``, ``10.0.0.5``,
``169.254.169.254`` (a cloud's metadata service) or ``localhost`` would make the
downloading machine fetch its own internal services. Such rows are refused with a reason
(``private_address``), as are URLs that are not plain http(s) (``bad_url``: ``file://``
would read local files). Host names are resolved (once per host, in threads) and refused
when any address they resolve to is private; a name that does not resolve is left to the
downloader, which records it as a failed download.
"""

from __future__ import annotations

import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor, wait
from functools import lru_cache

import polars as pl

# scheme://[userinfo@]host[:port]...; host may be an [IPv6] literal
HOST = r"^(?i:https?)://(?:[^@/?#]*@)?(\[[^\]]*\]|[^:/?#]*)"
LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".lan", ".intranet")
RESOLVE_TIMEOUT_S = 10.0


def private_ip(text: str) -> bool | None:
    """True/False for an IP literal (IPv4, IPv6, IPv4-mapped), None when ``text`` is a name."""
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def _local_name(host: str) -> bool:
    host = host.rstrip(".").lower()
    return host == "localhost" or host.endswith(LOCAL_SUFFIXES) or "." not in host


@lru_cache(maxsize=1 << 16)
def _resolves_private(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False  # unresolvable: the download fails and says so
    return any(private_ip(info[4][0]) for info in infos)


def host_verdicts(hosts: list[str], resolve: bool = True) -> dict[str, str | None]:
    """host -> None (may be fetched) or why not."""
    verdicts: dict[str, str | None] = {}
    names = []
    for host in hosts:
        literal = private_ip(host)
        if literal is not None:
            verdicts[host] = "private, loopback or link-local address" if literal else None
        elif not host:
            verdicts[host] = "no host"
        elif _local_name(host):
            verdicts[host] = "local host name"
        else:
            verdicts[host] = None
            names.append(host)
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
    host = pl.col("url").str.extract(HOST, 1)
    frame = frame.with_columns(_host=host)
    hosts = frame.get_column("_host").drop_nulls().unique().to_list()
    verdicts = {} if allow_private else host_verdicts(hosts, resolve)
    why = pl.col("_host").replace_strict(verdicts, default=None, return_dtype=pl.String)
    return frame.with_columns(
        _refused=pl.when(pl.col("_host").is_null()).then(pl.lit("bad_url"))
        .when(why.is_not_null()).then(pl.lit("private_address")),
        _refused_why=pl.when(pl.col("_host").is_null()).then(pl.lit("not an http(s) URL with a host"))
        .otherwise(why),
    ).drop("_host")
