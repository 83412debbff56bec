"""A no-op gRPC server for the transport limit: any method, any request, a fixed-size reply.

Not on the serving path: `neuronserve bench` starts it in a subprocess (limits.py) and drives it with
the same load generator and the same request bytes as the real server, so the difference between
the two is what the model, the batcher and the services cost. The reply has the size of the real
scores response. Run: `python -m neuronserve.bench.echo --reply-bytes N [--port 0]`; it prints
`echo ready: port=PORT` on stdout when serving.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Coroutine
from typing import Any


async def serve(port: int, reply_bytes: int) -> None:
    import grpc

    reply = b"\0" * reply_bytes

    async def echo(request: bytes, context) -> bytes:
        return reply

    handler = grpc.unary_unary_rpc_method_handler(echo)  # no (de)serializers: raw bytes in and out

    class AnyMethod(grpc.GenericRpcHandler):
        def service(self, handler_call_details):
            return handler

    server = bench_server()
    server.add_generic_rpc_handlers((AnyMethod(),))
    await serve_until_signalled(server, port, "echo ready: port={port}")


def bench_server():
    """A grpc.aio server for bench's own subprocesses (echo, plain): messages up to 256 MiB."""
    import grpc

    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    return grpc.aio.server(options=options)


async def serve_until_signalled(server, port: int, ready: str) -> None:
    """Start `server` on 127.0.0.1:`port`, print `ready` (formatted with the bound port), serve until
    SIGTERM or SIGINT, then stop."""
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(ready.format(port=bound), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def run_server(main: Coroutine[Any, Any, None], name: str) -> None:
    """Run a bench server's `main` on uvloop (asyncio's loop without it) until it returns; a
    NeuronServeError (a bad --artifact) exits with one line naming the server, not a traceback."""
    from neuronserve.errors import NeuronServeError

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(main)
    except NeuronServeError as exc:
        raise SystemExit(f"{name}: {exc}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description="no-op gRPC server replying with a fixed number of bytes")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reply-bytes", type=int, default=64)
    args = parser.parse_args()
    run_server(serve(args.port, args.reply_bytes), "echo server")


if __name__ == "__main__":
    main()
