"""An echo client on aioquic (another QUIC stack, not written for this project): the same
protocol and report as plain-echo-client (see tests/plain-quic/src/lib.rs).

    python3 aioquic_echo_client.py --target 10.235.0.1:5301 --json report.json

One connection; every interval a bidirectional stream carries a request (its sequence number,
8 bytes big-endian, then a pattern) and the server echoes it; every byte is checked. Gaps
between completed echoes longer than --gap-ms are reported with their start (milliseconds
after `started_unix_ms`). Stops on SIGINT or SIGTERM and writes the JSON report.
"""

import argparse
import asyncio
import json
import signal
import ssl
import time

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived

ALPN = "plain-echo"


def payload(seq: int, size: int) -> bytes:
    body = bytes(((seq + i) & 0xFF) for i in range(max(size - 8, 0)))
    return seq.to_bytes(8, "big") + body


class EchoProtocol(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._waiting = {}

    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived):
            entry = self._waiting.get(event.stream_id)
            if entry is None:
                return
            entry["data"] += event.data
            if event.end_stream and not entry["done"].done():
                entry["done"].set_result(bytes(entry["data"]))

    async def echo(self, request: bytes) -> bytes:
        stream_id = self._quic.get_next_available_stream_id()
        done = asyncio.get_running_loop().create_future()
        self._waiting[stream_id] = {"data": bytearray(), "done": done}
        self._quic.send_stream_data(stream_id, request, end_stream=True)
        self.transmit()
        try:
            return await done
        finally:
            del self._waiting[stream_id]


async def run(args, report):
    host, port = args.target.rsplit(":", 1)
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], idle_timeout=30.0)
    config.verify_mode = ssl.CERT_NONE
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with connect(
        host, int(port), configuration=config, create_protocol=EchoProtocol,
        wait_connected=True,
    ) as client:
        report["connections"] = 1
        started = time.monotonic()
        report["started_unix_ms"] = time.time() * 1e3
        last = None
        seq = 0
        while not stop.is_set():
            seq += 1
            request = payload(seq, args.size)
            echo = asyncio.ensure_future(client.echo(request))
            stopped = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({echo, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if echo not in done:
                echo.cancel()
                break
            stopped.cancel()
            got = echo.result()
            now = time.monotonic()
            if got == request:
                report["echoes"] += 1
            else:
                report["corrupted"] += 1
            if last is not None and (now - last) * 1e3 > args.gap_ms:
                report["gaps"].append([(last - started) * 1e3, (now - last) * 1e3])
            last = now
            try:
                await asyncio.wait_for(stop.wait(), args.interval_ms / 1e3)
            except asyncio.TimeoutError:
                pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the server")
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    args = parser.parse_args()
    if not 8 <= args.size <= 65536:
        parser.error("--size must be 8..=65536")
    report = {
        "target": args.target, "connections": 0, "echoes": 0, "corrupted": 0, "gaps": [],
        "gap_threshold_ms": args.gap_ms, "started_unix_ms": 0.0, "error": None,
        "stack": "aioquic",
    }
    try:
        asyncio.run(run(args, report))
    except Exception as e:  # the report says why
        report["error"] = f"{type(e).__name__}: {e}"
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    raise SystemExit(1 if report["error"] else 0)


if __name__ == "__main__":
    main()
