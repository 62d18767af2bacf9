"""The TCP sockets a process tree listens on, read from /proc (Linux): for tests that check what
a local Ray cluster exposes."""
from __future__ import annotations

import ipaddress
import os


def _listening_inodes() -> dict[str, tuple[str, int]]:
    """inode -> (ip, port) of every listening TCP socket on the machine."""
    found = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc stores the address as 32-bit words in host (little-endian) order
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(packed)
            found[fields[9]] = (str(ip), int(hex_port, 16))
    return found


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = open(f"/proc/{name}/stat").read()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(name))
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += children.get(pid, [])
    return seen


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def listening_sockets(root: int) -> list[dict]:
    """Every TCP socket that ``root`` or a descendant listens on: pid, ip, port, loopback."""
    inodes = _listening_inodes()
    out = []
    for pid in sorted(descendants(root)):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                ip, port = inodes[link[8:-1]]
                out.append({"pid": pid, "ip": ip, "port": port, "loopback": is_loopback(ip)})
    return out
