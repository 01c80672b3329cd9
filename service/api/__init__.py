"""Protocol layers: thin translations between a wire protocol and ``service.engine.dataplane``."""
