"""Generated gRPC/protobuf code of the split-learning trunk service.

``trunk.proto`` is the source of truth; ``trunk_pb2.py``, ``trunk_pb2.pyi`` and
``trunk_pb2_grpc.py`` are generated from it by :mod:`protocols.proto.generate`
(pinned generator versions, see there) and committed. Import the generated
modules explicitly (``from protocols.proto import trunk_pb2``); this package
imports nothing itself.
"""
