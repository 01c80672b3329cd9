"""The multiplexed stream ``/v1/mux``: steps of many sessions per websocket frame.

``codec`` is the wire format (shared by the server and ``service.client.mux``); ``endpoint`` is
the websocket endpoint, a thin layer over ``service.engine.groups.StreamGroup``.
"""
