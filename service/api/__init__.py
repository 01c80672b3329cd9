"""Protocol layers: thin translations between a wire protocol and ``service.dataplane``."""
