"""An HTTP/3 download on aioquic (a QUIC and HTTP/3 stack not written for this project).

    python3 aioquic_h3_get.py --target 10.235.0.1:5302 --path /big.bin --json report.json

One connection, one GET; the body is hashed as it arrives (SHA-256) and not kept. The JSON
report says the status, the bytes and their digest, how many handshakes the connection made
(aioquic's HandshakeCompleted events: 1 unless something re-handshook) and whether it was
terminated, and every gap between two pieces of the body longer than --gap-ms (its start in
milliseconds after `started_unix_ms`, and its length). Exits 0 once the body has ended, 1 on
any error (the report says which), 2 on bad arguments.
"""

import argparse
import asyncio
import hashlib
import json
import ssl
import time

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted


class GetProtocol(QuicConnectionProtocol):
    def __init__(self, *args, report, gap_ms, **kwargs):
        super().__init__(*args, **kwargs)
        self._h3 = H3Connection(self._quic)
        self._report = report
        self._gap_ms = gap_ms
        self._digest = hashlib.sha256()
        self._stream_id = None
        self._started = time.monotonic()
        self._last = None
        self.done = asyncio.get_running_loop().create_future()

    def get(self, authority: str, path: str):
        self._stream_id = self._quic.get_next_available_stream_id()
        self._h3.send_headers(
            stream_id=self._stream_id,
            headers=[
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
            ],
            end_stream=True,
        )
        self._started = time.monotonic()
        self._report["started_unix_ms"] = time.time() * 1e3
        self.transmit()

    def _finish(self, error=None):
        if self.done.done():
            return
        if error is not None:
            self.done.set_exception(RuntimeError(error))
        else:
            self.done.set_result(None)

    def quic_event_received(self, event):
        if isinstance(event, HandshakeCompleted):
            self._report["handshakes"] += 1
        elif isinstance(event, ConnectionTerminated):
            self._report["terminated"] = {
                "error_code": event.error_code, "reason": event.reason_phrase,
            }
            self._finish(f"connection terminated: {event.error_code} {event.reason_phrase}")
            return
        for h3_event in self._h3.handle_event(event):
            if getattr(h3_event, "stream_id", None) != self._stream_id:
                continue
            if isinstance(h3_event, HeadersReceived):
                for name, value in h3_event.headers:
                    if name == b":status":
                        self._report["status"] = int(value)
            elif isinstance(h3_event, DataReceived):
                now = time.monotonic()
                if h3_event.data:
                    self._digest.update(h3_event.data)
                    self._report["bytes"] += len(h3_event.data)
                    if self._last is not None and (now - self._last) * 1e3 > self._gap_ms:
                        self._report["gaps"].append(
                            [(self._last - self._started) * 1e3, (now - self._last) * 1e3]
                        )
                    if self._report["first_byte_unix_ms"] is None:
                        self._report["first_byte_unix_ms"] = time.time() * 1e3
                    self._last = now
            if getattr(h3_event, "stream_ended", False):
                self._report["sha256"] = self._digest.hexdigest()
                self._report["ended_unix_ms"] = time.time() * 1e3
                self._finish()


async def run(args, report):
    host, port = args.target.rsplit(":", 1)
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, idle_timeout=30.0)
    config.verify_mode = ssl.CERT_NONE

    def protocol(*a, **kw):
        return GetProtocol(*a, report=report, gap_ms=args.gap_ms, **kw)

    async with connect(
        host, int(port), configuration=config, create_protocol=protocol, wait_connected=True,
    ) as client:
        report["connections"] = 1
        client.get(args.target, args.path)
        await asyncio.wait_for(client.done, args.timeout_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the server")
    parser.add_argument("--path", required=True, help="the path to GET, e.g. /big.bin")
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args()
    if not args.path.startswith("/"):
        parser.error("--path must start with /")
    if args.timeout_s <= 0 or args.gap_ms <= 0:
        parser.error("--timeout-s and --gap-ms must be positive")
    report = {
        "target": args.target, "path": args.path, "connections": 0, "handshakes": 0,
        "status": None, "bytes": 0, "sha256": None, "gaps": [], "gap_threshold_ms": args.gap_ms,
        "started_unix_ms": 0.0, "first_byte_unix_ms": None, "ended_unix_ms": None,
        "terminated": None, "error": None, "stack": "aioquic",
    }
    try:
        asyncio.run(run(args, report))
    except asyncio.TimeoutError:
        report["error"] = f"the body did not end within {args.timeout_s} s"
    except Exception as e:  # the report says why
        report["error"] = f"{type(e).__name__}: {e}"
    if report["error"] is None and report["status"] != 200:
        report["error"] = f"status {report['status']}"
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    raise SystemExit(1 if report["error"] else 0)


if __name__ == "__main__":
    main()
