"""The committed health stubs are exactly what grpcio-tools makes from health.proto, and
they load with the protobuf runtime installed here."""

from __future__ import annotations

import difflib
import re

import google.protobuf

from suanli.fault.proto.generate import HERE, OUTPUTS, generate


def test_committed_stubs_match_the_proto(tmp_path):
    from importlib.metadata import version

    made_with = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", (HERE / "health_pb2_grpc.py").read_text()).group(1)
    tools = version("grpcio-tools")
    generate(tmp_path)
    for name in OUTPUTS:
        fresh, committed = (tmp_path / name).read_text(), (HERE / name).read_text()
        if fresh != committed:
            diff = "".join(list(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True),
                                                     f"committed/{name}", f"regenerated/{name}"))[:40])
            hint = "" if tools == made_with else f" (committed stubs were made with grpcio-tools {made_with}, this is {tools})"
            raise AssertionError(f"fault/proto/{name} is stale{hint}; run `python -m suanli.fault.proto.generate`\n{diff}")


def test_stubs_load_with_the_installed_protobuf():
    from suanli.fault.proto import health_pb2, health_pb2_grpc

    made_with = re.search(r"Protobuf Python Version: ([\d.]+)", (HERE / "health_pb2.py").read_text()).group(1)
    as_tuple = lambda v: tuple(int(x) for x in v.split(".")[:3])
    assert as_tuple(made_with) <= as_tuple(google.protobuf.__version__), \
        f"stubs made with protobuf {made_with}, runtime is {google.protobuf.__version__}: regenerate or upgrade"
    assert health_pb2.DESCRIPTOR.name == "suanli/fault/proto/health.proto"
    assert hasattr(health_pb2_grpc, "HealthStub") and hasattr(health_pb2_grpc, "HealthServicer")
