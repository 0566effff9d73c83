"""An echo server on aioquic (a QUIC stack not written for this project): the server side of
plain-echo-server's protocol (see tests/plain-quic/src/lib.rs), ALPN "plain-echo".

    python3 aioquic_echo_server.py --listen 0.0.0.0:4242

Each bidirectional stream a client opens is echoed back once the client finishes it (at most
64 KiB; a longer request is reset and stopped, and the rest of it ignored). A self-signed certificate for "localhost" is made at
start-up and kept in memory only (clients of the scenario skip verification). Prints one line
per connection whose handshake completed (`accepted HOST:PORT`): the end-to-end test counts
handshakes from it. Stops on SIGINT or SIGTERM.
"""

import argparse
import asyncio
import datetime
import signal
import sys

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import HandshakeCompleted, StreamDataReceived
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ALPN = "plain-echo"
MAX_REQUEST = 64 * 1024


def self_signed():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


class EchoServer(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._requests = {}
        # Streams reset for a request over MAX_REQUEST: whatever else arrives on them is
        # ignored (answering or resetting again would raise inside aioquic).
        self._refused = set()

    def quic_event_received(self, event):
        if isinstance(event, HandshakeCompleted):
            host, port = self._quic._network_paths[0].addr[:2]
            print(f"accepted {host}:{port}", flush=True)
        elif isinstance(event, StreamDataReceived):
            if event.stream_id in self._refused:
                return
            data = self._requests.setdefault(event.stream_id, bytearray())
            data += event.data
            if len(data) > MAX_REQUEST:
                del self._requests[event.stream_id]
                self._refused.add(event.stream_id)
                self._quic.reset_stream(event.stream_id, 1)
                self._quic.stop_stream(event.stream_id, 1)
            elif event.end_stream:
                self._quic.send_stream_data(event.stream_id, bytes(data), end_stream=True)
                del self._requests[event.stream_id]
            self.transmit()


async def run(host, port):
    config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN], idle_timeout=30.0)
    config.certificate, config.private_key = self_signed()
    server = await serve(host, port, configuration=config, create_protocol=EchoServer)
    print(f"listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="0.0.0.0:4242", help="HOST:PORT to bind")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    try:
        port = int(port)
    except ValueError:
        parser.error(f"--listen {args.listen!r}: not HOST:PORT")
    if not host or not 0 < port < 65536:
        parser.error(f"--listen {args.listen!r}: not HOST:PORT")
    try:
        asyncio.run(run(host, port))
    except OSError as e:
        print(f"cannot serve on {args.listen}: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
