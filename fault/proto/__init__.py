"""The health protocol: `health.proto` and the stubs generated from it (committed).

Regenerate after editing health.proto, from the repository root:

    python -m suanli.fault.proto.generate

(grpcio-tools writes health_pb2.py, health_pb2.pyi and health_pb2_grpc.py here; the
protoc bundled with grpcio-tools stamps its version into health_pb2.py, and the protobuf
runtime refuses gencode newer than itself, so regenerate with a grpcio-tools whose protoc
is not newer than the oldest protobuf you deploy.) tests/test_health_proto.py regenerates
into a temporary directory and fails if the committed files differ.
"""

from . import health_pb2, health_pb2_grpc

__all__ = ["health_pb2", "health_pb2_grpc"]
