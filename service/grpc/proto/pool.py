"""The descriptor pool of rnnserve's gRPC messages, apart from protobuf's default pool.

``tritonclient.grpc`` registers the same ``inference.*`` message names in the default pool, which
refuses a second definition of a name; a pool of our own lets both live in one process.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
