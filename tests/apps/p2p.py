#!/usr/bin/env python3
"""A tiny UDP peer-to-peer program for natscope's own tests of `lab grid --app`.

One file, three roles (argv[1]): `server` (rendezvous and relay), `listen` (peer b) and
`connect` (peer a), and three behaviours (argv[2]) whose paths the lab must tell apart:

  direct  both peers punch towards each other, then exchange data on the punched path;
  oneway  a sends punch packets to b, b never answers directly: the data goes through the relay;
  liar    like oneway, but the connector's last line claims {"path": "direct"}.

Wire format (text datagrams): REG id | WHO id -> AT ip port / NONE | PEER ip port (server to the
one asked about) | PUNCH | D n / E n (data and echo) | R to from msg (relay via the server).
"""

import json
import socket
import sys
import time

SERVER_PORT = 4000
LISTEN_PORT = 4001
COUNT = 5


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def server(host):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, SERVER_PORT))
    peers = {}
    log("server on", host, SERVER_PORT)
    while True:
        data, src = s.recvfrom(2048)
        f = data.decode(errors="replace").split(" ", 3)
        if f[0] == "REG" and len(f) >= 2:
            peers[f[1]] = src
        elif f[0] == "WHO" and len(f) >= 3:
            asker, want = f[1], f[2]
            peers[asker] = src
            if want in peers:
                ip, port = peers[want]
                s.sendto(f"AT {ip} {port}".encode(), src)
                s.sendto(f"PEER {src[0]} {src[1]}".encode(), peers[want])
            else:
                s.sendto(b"NONE", src)
        elif f[0] == "R" and len(f) == 4 and f[1] in peers:
            s.sendto(f"R {f[2]} {f[3]}".encode(), peers[f[1]])


def listen(server_ip, mode):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", LISTEN_PORT))
    srv = (server_ip, SERVER_PORT)
    last_reg = 0.0
    # Punch towards a's mapping for a while, not only once: on a loaded machine a's first
    # punch can come after b's first few, which a's filter then refuses.
    peer, punch_until, last_punch = None, 0.0, 0.0
    s.settimeout(0.05)
    while True:
        now = time.monotonic()
        if now - last_reg > 0.5:
            s.sendto(b"REG b", srv)
            last_reg = now
        if peer is not None and now < punch_until and now - last_punch > 0.1:
            s.sendto(b"PUNCH", peer)
            last_punch = now
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            continue
        f = data.decode(errors="replace").split(" ")
        if src == srv and f[0] == "PEER" and mode == "direct":
            peer = (f[1], int(f[2]))
            punch_until = time.monotonic() + 3
            for _ in range(5):
                s.sendto(b"PUNCH", peer)
                time.sleep(0.02)
        elif src == srv and f[0] == "R" and len(f) >= 3 and f[2] == "D":
            s.sendto(f"R {f[1]} b E {f[3]}".encode(), srv)
        elif src != srv and f[0] == "D" and mode == "direct":
            punch_until = 0.0  # data arrives directly: the path is open
            s.sendto(f"E {f[1]}".encode(), src)
        elif src != srv and f[0] == "PUNCH" and mode == "direct":
            s.sendto(b"PUNCH", src)


def connect(server_ip, mode):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    s.settimeout(0.2)
    srv = (server_ip, SERVER_PORT)
    peer = None
    deadline = time.monotonic() + 15
    while peer is None:
        if time.monotonic() > deadline:
            log("b never registered")
            sys.exit(1)
        s.sendto(b"WHO a b", srv)
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            continue
        f = data.decode(errors="replace").split(" ")
        if src == srv and f[0] == "AT":
            peer = (f[1], int(f[2]))
    log("b is at", peer)
    path = None
    if mode == "direct":
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and path is None:
            s.sendto(b"PUNCH", peer)
            try:
                data, src = s.recvfrom(2048)
            except socket.timeout:
                continue
            # A NAT may give b's punch a port other than the one the server saw (a kernel NAT
            # does when a's punch already holds that tuple): learn it, as ICE learns a
            # peer-reflexive candidate.
            if src[0] == peer[0] and src != srv:
                peer = src
                path = "direct"
    else:
        for _ in range(3):
            s.sendto(b"PUNCH", peer)
            time.sleep(0.02)
    if path is None:
        path = "relayed"
    echoed = 0
    for n in range(COUNT):
        msg = f"D {n}"
        want = f"E {n}"
        for _ in range(50):
            if path == "direct":
                s.sendto(msg.encode(), peer)
            else:
                s.sendto(f"R b a {msg}".encode(), srv)
            try:
                data, src = s.recvfrom(2048)
            except socket.timeout:
                continue
            text = data.decode(errors="replace")
            if text == want or text == f"R b {want}":
                echoed += 1
                break
    log(f"{echoed}/{COUNT} echoed over the {path} path")
    if echoed != COUNT:
        sys.exit(1)
    claim = "direct" if mode == "liar" else path
    print(json.dumps({"path": claim}), flush=True)


if __name__ == "__main__":
    role, mode = sys.argv[1], sys.argv[2]
    server_ip = sys.argv[3]
    {"server": server, "listen": listen, "connect": connect}[role](
        *(server_ip, mode) if role != "server" else (server_ip,)
    )
