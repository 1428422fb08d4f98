#!/usr/bin/env python3
"""Seed each fuzz target's corpus (fuzz/corpus/<target>/) from the team's reference
samples (../shared/reference/samples/ beside the repository) and the repository's own
files. Idempotent: a seed is named by its content's hash. Falls back to the repository's
copy of the samples (src/sim/samples.jsonl) when ../shared is not there."""

import hashlib
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SAMPLES = os.path.join(REPO, "..", "shared", "reference", "samples")


def lines(path):
    try:
        with open(path, "rb") as f:
            return [l.rstrip(b"\n") for l in f if l.strip()]
    except OSError:
        return []


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def put(target, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def frame(opcode, payload, mask=None, fin=True):
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head += bytes([m | n])
    elif n <= 0xFFFF:
        head += bytes([m | 126]) + struct.pack(">H", n)
    else:
        head += bytes([m | 127]) + struct.pack(">Q", n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += bytes(mask)
    return head + payload


def main():
    events = lines(os.path.join(SAMPLES, "events.jsonl")) or lines(
        os.path.join(REPO, "src", "sim", "samples.jsonl")
    )
    requests = lines(os.path.join(SAMPLES, "requests.jsonl")) or [
        b'{"action":"get_status","params":{},"echo":"1"}'
    ]
    mask = [0x37, 0xFA, 0x21, 0x3D]
    # Frame scanner: byte 0 side (bit 0 client) and limit (bit 1 none), byte 1 read size.
    server = b"".join(frame(1, e) for e in events)
    put("frame_scanner", bytes([0, 7]) + server + frame(8, b"\x03\xe8bye"))
    put("frame_scanner", bytes([2, 64]) + frame(2, b"\x00" * 300) + frame(9, b"p"))
    client = b"".join(frame(1, r, mask) for r in requests)
    put("frame_scanner", bytes([1, 5]) + client + frame(8, b"\x03\xe8", mask))
    frag = frame(1, "晴".encode(), mask, fin=False) + frame(0, ", 25°C".encode(), mask)
    put("frame_scanner", bytes([1, 3]) + frag)
    # The length that used to wrap the message total.
    wrap = frame(1, b"x", mask, fin=False) + bytes([0x80, 0xFF]) + b"\xff" * 8 + bytes(mask)
    put("frame_scanner", bytes([1, 11]) + wrap)
    # Classifier: every sample whole, and the first bytes of each.
    for e in events + requests:
        put("classifier", e)
        put("classifier", e[:32])
    # Handshake: what real clients send.
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    for path, auth in [
        (b"/", b"Authorization: Bearer s3cret\r\n"),
        (b"/event?access_token=a%20b", b""),
        (b"/api", b"Authorization: Token t\r\n"),
    ]:
        put(
            "handshake",
            b"GET " + path + b" HTTP/1.1\r\nHost: lifeguard:6700\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n"
            + auth + b"\r\n",
        )
    # NapCat's config files, as NapCat writes them.
    for name in ("napcat-onebot11-v4.json", "napcat-onebot11-flat.json"):
        data = read(os.path.join(SAMPLES, name))
        if data:
            put("napcat_config", data)
    put("napcat_config", json.dumps({"network": {"websocketServers": [{"name": "ws", "enable": True, "port": 3001, "token": ""}]}}).encode())
    # lifeguard's own config: the example file, and one key at a time.
    example = read(os.path.join(REPO, "lifeguard.example.toml")) or b""
    put("lifeguard_config", example)
    for line in example.splitlines():
        if b" = " in line:
            put("lifeguard_config", line.lstrip(b"# ") + b"\n")
    print("seeded:", ", ".join(sorted(os.listdir(os.path.join(HERE, "corpus")))))


if __name__ == "__main__":
    sys.exit(main())
