"""Where a worker's KV transfers listen: UCX (under NIXL) on the interface the worker was told to
listen on, not on every interface."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct


def keep_kv_transfers_on(host: str) -> None:
    """UCX (under NIXL) listens on every network interface unless told otherwise: a worker told
    to listen on one address keeps its KV transfers on that address's interface (`lo` for
    loopback). A `UCX_NET_DEVICES` the user set wins; a wildcard or a name is left to UCX.
    On a GPU, UCX 1.23 keeps `cuda_ipc` for the pages with `UCX_NET_DEVICES=lo` (the device
    transports are not network devices; measured on an H200, docs/kv_transfer.md)."""
    if "UCX_NET_DEVICES" in os.environ:
        return
    try:
        address = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
    except ValueError:
        return
    interface = "lo" if address.is_loopback else interface_of(str(address))
    if interface is not None:
        os.environ["UCX_NET_DEVICES"] = interface


def interface_of(address: str) -> str | None:
    """The network interface whose IPv4 address is `address` (Linux), or None."""
    try:
        packed = socket.inet_aton(address)
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                request = struct.pack("256s", name.encode()[:15])
                reply = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, request)
            except OSError:  # no IPv4 address on it
                continue
            if reply[20:24] == packed:  # struct ifreq: name[16], then sockaddr_in (port, then addr)
                return name
    return None


_SIOCGIFADDR = 0x8915
