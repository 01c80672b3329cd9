"""The KServe V2 / Triton gRPC protos and their generated modules (``make grpc-stubs``)."""
