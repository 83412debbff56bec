"""Registration of a servicer with grpc.aio: as the generated add_*_to_server, except that a request
body that does not parse is answered INVALID_ARGUMENT with one line (and counted), never the UNKNOWN and
server-side traceback the generated deserializer gives. Every RPC the server registers goes through it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from neuronserve.service import UNKNOWN_MODEL, bounded


@dataclass(frozen=True)
class _Malformed:
    error: str


def streaming(method) -> tuple[bool, bool]:
    """(client_streaming, server_streaming) of a MethodDescriptor. protobuf < 3.20 (the 3.19.5 of AWS's
    Inf1 image) has no such attributes: there they come from the method's descriptor proto."""
    try:
        return method.client_streaming, method.server_streaming
    except AttributeError:
        from google.protobuf import descriptor_pb2

        service = method.containing_service
        file = descriptor_pb2.FileDescriptorProto.FromString(service.file.serialized_pb)
        (proto,) = [m for s in file.service if s.name == service.name for m in s.method if m.name == method.name]
        return proto.client_streaming, proto.server_streaming


def add_service(server: grpc.aio.Server, servicer, service, messages, metrics=None) -> None:
    """Register `servicer` for `service` (a ServiceDescriptor; request and response classes from the
    generated module `messages`) as the generated add_*_to_server does, except that a request body that
    does not parse is answered INVALID_ARGUMENT with one line and counted in `metrics` (default: the
    servicer's) as a failure of model UNKNOWN_MODEL. (The generated deserializer raises inside gRPC:
    the client sees UNKNOWN, and the server logs a traceback per request.) Any cardinality: unary or
    streaming requests (each message of a stream is checked as it is read), unary or streaming replies
    (an async generator, or a coroutine writing with context.write, as grpc_health's Watch)."""
    guard = _Guard(getattr(servicer, "metrics", None) if metrics is None else metrics)
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: kinds[streaming(method)](
            guard.wrap(getattr(servicer, method.name), method),
            request_deserializer=_lenient(getattr(messages, method.input_type.name).FromString),
            response_serializer=getattr(messages, method.output_type.name).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _lenient(parse):
    """A deserializer that returns _Malformed instead of raising inside gRPC."""

    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as exc:
            return _Malformed(str(exc))

    return deserialize


class _Guard:
    """Wraps a handler of any cardinality so a _Malformed request is refused before the handler sees it."""

    def __init__(self, metrics) -> None:
        self.metrics = metrics

    async def refuse(self, request: _Malformed, type_name: str, context) -> None:
        if self.metrics is not None:
            self.metrics.request(UNKNOWN_MODEL, grpc.StatusCode.INVALID_ARGUMENT.name, 0.0)
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            bounded(f"the request body is not a valid {type_name} protobuf ({request.error})"),
        )

    async def checked(self, requests, type_name: str, context):
        async for request in requests:
            if isinstance(request, _Malformed):
                await self.refuse(request, type_name, context)
            yield request

    def wrap(self, handler, method):
        type_name = method.input_type.full_name
        replies_stream = inspect.isasyncgenfunction(handler)
        if streaming(method)[0]:  # the handler reads the stream: each message is checked as it comes
            return self._stream_in(handler, type_name, replies_stream)
        return self._unary_in(handler, type_name, replies_stream)

    def _stream_in(self, handler, type_name: str, replies_stream: bool):
        if replies_stream:

            async def call(requests, context):
                async for reply in handler(self.checked(requests, type_name, context), context):
                    yield reply

            return call

        async def call_unary(requests, context):
            return await handler(self.checked(requests, type_name, context), context)

        return call_unary

    def _unary_in(self, handler, type_name: str, replies_stream: bool):
        if replies_stream:

            async def call(request, context):
                if isinstance(request, _Malformed):
                    await self.refuse(request, type_name, context)
                async for reply in handler(request, context):
                    yield reply

            return call

        async def call_unary(request, context):
            if isinstance(request, _Malformed):
                await self.refuse(request, type_name, context)
            reply = handler(request, context)  # (a coroutine, or a generated base class's sync stub)
            return await reply if inspect.isawaitable(reply) else reply

        return call_unary
