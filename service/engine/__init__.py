"""The engine: everything between a model folder and a protocol-agnostic call.

Data flows one way through it::

    registry (validate model folders) -> runtime (ONNX Runtime session)
      -> state_pool / device_pool (session states) + batcher (cross-session calls)
      -> models (served versions) + sessions (lifecycle) + store (durable sessions)
      -> dataplane (the calls every protocol layer makes)

Protocol layers (``service.api``, ``service.v2`` and the others) import the engine; the engine
never imports them.
"""
