"""The Open Inference Protocol (KServe V2) over gRPC, with Triton's streaming and sequences."""
