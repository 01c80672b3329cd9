"""A streaming client for the service's websocket, as a library and a command.

``python -m service.client stream --url ws://127.0.0.1:8000 --model NAME --csv FILE --column C``
streams a series and prints each prediction as it arrives; ``MuxClient`` streams many sessions over
one ``/v1/mux`` connection; see ``service.client.__main__``.
"""

from service.client.mux import MuxClient, MuxError, Opened, stream_columns
from service.client.series import ClientError, SeriesError, iter_text_rows, read_csv_rows
from service.client.stream import RetryPolicy, StepResult, StreamClient, StreamTarget

__all__ = [
    "ClientError",
    "MuxClient",
    "MuxError",
    "Opened",
    "RetryPolicy",
    "SeriesError",
    "StepResult",
    "StreamClient",
    "StreamTarget",
    "iter_text_rows",
    "read_csv_rows",
    "stream_columns",
]
