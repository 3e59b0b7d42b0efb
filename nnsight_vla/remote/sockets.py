"""Which TCP sockets some processes listen on, and this host's own addresses (stdlib only: /proc and ioctl), so
the loopback stack can prove that nothing it started is reachable from the network."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from pathlib import Path

__all__ = ["host_addresses", "is_loopback", "listening_sockets"]

_SIOCGIFADDR = 0x8915
_TCP_LISTEN = "0A"


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 (an IPv6 socket bound to IPv4 loopback)
    return (mapped or ip).is_loopback


def host_addresses() -> list[str]:
    """This host's interface addresses (IPv4 through SIOCGIFADDR, IPv6 from /proc/net/if_inet6)."""
    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:  # no IPv4 address on this interface
                continue
        found.append(socket.inet_ntoa(packed[20:24]))
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            found.append(str(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))))
    except (OSError, ValueError, IndexError):
        pass
    return found


def _decode(hex_address: str) -> tuple[str, int]:
    """An address:port of /proc/net/tcp{,6}: 32-bit words in host (little-endian) byte order, port in hex."""
    address, port = hex_address.split(":")
    raw = bytes.fromhex(address)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw)), int(port, 16)


def listening_sockets(pids: list[int]) -> list[dict]:
    """TCP sockets that ``pids`` listen on: ``{"pid", "process", "address", "port"}`` (read from /proc)."""
    owners: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    owners[target[8:-1]] = pid
        except OSError:  # gone, or not ours to read
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] != _TCP_LISTEN or fields[9] not in owners:
                continue
            address, port = _decode(fields[1])
            pid = owners[fields[9]]
            try:
                process = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                process = "?"
            found.append({"pid": pid, "process": process, "address": address, "port": port})
    return found
