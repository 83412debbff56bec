"""Build hook: the protobuf and gRPC modules of neuronserve/protos are generated when the package is built.

Everything else about the package is in pyproject.toml. `build_py` (which runs for a wheel, `pip install .`,
and an editable `pip install -e .`) compiles each neuronserve/protos/*.proto with grpc_tools' protoc (a
build-system requirement only, never a run-time dependency) into a FileDescriptorProto and writes:

- `<name>_pb2.py`: the serialized descriptor, added to the default pool, and the message classes built
  from it at import by protobuf's own builder (protobuf >= 3.20, what protoc emits today) or, on
  protobuf 3.19 (AWS's Inf1 image), by the reflection calls protoc 3.19 emitted. No runtime_version
  check: the same file imports on protobuf 3.19.5 through 7.x.
- `<name>_pb2_grpc.py`: `<Service>Stub`, `<Service>Servicer` and `add_<Service>Servicer_to_server`, as
  grpc_tools' plugin writes them, without its grpcio version check (they work on grpcio >= 1.48).

A wheel gets them in its build directory; an editable install (setuptools sets `editable_mode`) gets them
next to the .proto sources, where the editable finder looks (they are git-ignored). Nothing is written
at import or at run time.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_PACKAGE = "neuronserve.protos"
PROTO_DIR = ROOT / "neuronserve" / "protos"

_PB2 = '''# Generated from {source} by neuronserve's setup.py at build time. DO NOT EDIT.
"""Messages of {source}: the serialized descriptor and its classes (protobuf 3.19 through 7.x)."""
from google.protobuf import descriptor_pool as _descriptor_pool
from google.protobuf import symbol_database as _symbol_database

_sym_db = _symbol_database.Default()

DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile({serialized!r})

try:  # protobuf >= 3.20: what protoc emits today
    from google.protobuf.internal import builder as _builder
except ImportError:  # protobuf 3.19: what protoc 3.19 emitted
    _builder = None

if _builder is not None:
    _builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, globals())
    _builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, {module!r}, globals())
else:
    from google.protobuf import message as _message
    from google.protobuf import reflection as _reflection
    from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

    def _message_class(descriptor):
        attributes = {{"DESCRIPTOR": descriptor, "__module__": {module!r}}}
        for nested in descriptor.nested_types:
            attributes[nested.name] = _message_class(nested)
        cls = _reflection.GeneratedProtocolMessageType(descriptor.name, (_message.Message,), attributes)
        _sym_db.RegisterMessage(cls)
        return cls

    for _name, _descriptor in DESCRIPTOR.message_types_by_name.items():
        globals()[_name] = _message_class(_descriptor)
    for _name, _enum in DESCRIPTOR.enum_types_by_name.items():
        globals()[_name] = _enum_type_wrapper.EnumTypeWrapper(_enum)
        for _value in _enum.values:
            globals()[_value.name] = _value.number
'''

_GRPC_HEAD = '''# Generated from {source} by neuronserve's setup.py at build time. DO NOT EDIT.
"""Client and server classes of the services of {source} (grpcio >= 1.48)."""
import grpc

from {package} import {pb2} as _messages


def _method(channel, cardinality, path, request, response):
    factory = getattr(channel, cardinality)
    try:  # grpcio >= 1.62: a registered method (no per-call lookup of the path)
        return factory(path, request_serializer=request.SerializeToString, response_deserializer=response.FromString, _registered_method=True)
    except TypeError:
        return factory(path, request_serializer=request.SerializeToString, response_deserializer=response.FromString)'''

_CARDINALITY = {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary", (True, True): "stream_stream"}


def _python_name(full_name: str, proto) -> str:
    """`.pkg.Message` or `.pkg.Outer.Inner` -> `_messages.Message` / `_messages.Outer.Inner`."""
    prefix = f".{proto.package}." if proto.package else "."
    if not full_name.startswith(prefix):
        raise ValueError(f"{proto.name}: {full_name} is not a message of this file (imports are not supported)")
    return "_messages." + full_name[len(prefix):]


def _grpc_module(proto, pb2: str) -> str:
    lines = [_GRPC_HEAD.format(source=proto.name, package=PROTO_PACKAGE, pb2=pb2)]
    for service in proto.service:
        full = f"{proto.package}.{service.name}" if proto.package else service.name
        methods = [(m.name, _CARDINALITY[(m.client_streaming, m.server_streaming)], _python_name(m.input_type, proto), _python_name(m.output_type, proto)) for m in service.method]
        lines += ["", "", f"class {service.name}Stub(object):", f'    """Client of {full}."""', "", "    def __init__(self, channel):"]
        lines += [f"        self.{name} = _method(channel, {kind!r}, '/{full}/{name}', {req}, {resp})" for name, kind, req, resp in methods] or ["        pass"]
        lines += ["", "", f"class {service.name}Servicer(object):", f'    """Base class of a {full} implementation: each method answers UNIMPLEMENTED."""']
        for name, _, _, _ in methods:
            lines += ["", f"    def {name}(self, request, context):", "        context.set_code(grpc.StatusCode.UNIMPLEMENTED)",
                      "        context.set_details('Method not implemented!')", "        raise NotImplementedError('Method not implemented!')"]
        lines += ["", "", f"def add_{service.name}Servicer_to_server(servicer, server):", f'    """Serve {full} with `servicer` on `server` (grpc.Server or grpc.aio.Server)."""', "    handlers = {"]
        for name, kind, req, resp in methods:
            lines.append(f"        {name!r}: grpc.{kind}_rpc_method_handler(servicer.{name}, request_deserializer={req}.FromString, response_serializer={resp}.SerializeToString),")
        lines += ["    }", f"    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler({full!r}, handlers),))",
                  "    if hasattr(server, 'add_registered_method_handlers'):  # grpcio >= 1.62",
                  f"        server.add_registered_method_handlers({full!r}, handlers)"]
    return "\n".join(lines) + "\n"


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list:
    """Write <name>_pb2.py and <name>_pb2_grpc.py for every <name>.proto of `proto_dir` into `out_dir`
    (atomically, each file). Needs grpc_tools (build time). Returns the paths written."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    root = proto_dir.parent.parent  # descriptors name `neuronserve/protos/X.proto`, as imports expect
    written = []
    for source in sorted(proto_dir.glob("*.proto")):
        rel = source.relative_to(root).as_posix()
        with tempfile.TemporaryDirectory() as tmp:
            descriptor_set = Path(tmp) / "set.pb"
            code = protoc.main(["grpc_tools.protoc", f"-I{root}", f"--descriptor_set_out={descriptor_set}", rel])
            if code != 0:
                raise RuntimeError(f"protoc failed on {rel} (exit {code})")
            file_set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
        (proto,) = file_set.file
        if proto.dependency:
            raise RuntimeError(f"{rel} imports {list(proto.dependency)}: the stub generator handles self-contained files only")
        name = source.stem
        texts = {
            f"{name}_pb2.py": _PB2.format(source=rel, serialized=proto.SerializeToString(), module=f"{PROTO_PACKAGE}.{name}_pb2"),
            f"{name}_pb2_grpc.py": _grpc_module(proto, f"{name}_pb2"),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        for file_name, text in texts.items():
            target = out_dir / file_name
            tmp_path = target.with_name(f".{file_name}.{os.getpid()}")
            tmp_path.write_text(text, encoding="utf-8")
            os.replace(tmp_path, target)
            written.append(target)
    return written


class BuildPyWithStubs(build_py):
    """build_py, then the generated stubs: into the build directory, or beside the sources when editable."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            generate(PROTO_DIR)
        else:
            generate(Path(self.build_lib, *PROTO_PACKAGE.split(".")))


# The compiled kernels (neuronserve/native.py loads the library with ctypes: no Python API, so no numpy
# headers and one build for numpy 1.x and 2.x). Optional: without a C compiler the install succeeds and
# the tick and ScoreByIds run their numpy paths.
KERNELS = Extension(
    "neuronserve._kernels",
    sources=["csrc/tick_kernels.c", "csrc/cache_kernels.c"],
    depends=["csrc/tick_body.h"],
    extra_compile_args=["-O3", "-std=gnu11", "-Wno-psabi"],
    optional=True,
)

setup(cmdclass={"build_py": BuildPyWithStubs}, ext_modules=[KERNELS])
