"""Type stub for the Cython relay extension ``kuberun._relay``.

Mirrors ``kuberun._relay_py``, the pure-Python twin with the same API.
"""

from collections.abc import Callable, Sequence

from kuberun._relay_common import DEFAULT_MAX_PAYLOAD as DEFAULT_MAX_PAYLOAD
from kuberun._relay_common import DEFAULT_MAX_STATUS as DEFAULT_MAX_STATUS
from kuberun._relay_common import PROTOCOL_V1 as PROTOCOL_V1
from kuberun._relay_common import PROTOCOL_V4 as PROTOCOL_V4
from kuberun._relay_common import PROTOCOL_V5 as PROTOCOL_V5
from kuberun._relay_common import ExecSink, PortForwardSink
from kuberun._relay_common import decode_status as decode_status

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "DEFAULT_MAX_STATUS",
    "PROTOCOL_V1",
    "PROTOCOL_V4",
    "PROTOCOL_V5",
    "ExecDecoder",
    "ExecEncoder",
    "decode_status",
]

class ExecDecoder:
    """Sans-IO parser of server->client WebSocket frames plus Kubernetes channel demux."""

    @property
    def protocol(self) -> str: ...
    @property
    def forward_port(self) -> int | None: ...
    @property
    def stdout_bytes(self) -> int: ...
    @property
    def stderr_bytes(self) -> int: ...
    @property
    def unknown_frames(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def __init__(
        self,
        sink: ExecSink | PortForwardSink,
        protocol: str = ...,
        *,
        max_payload: int = ...,
        max_status: int = ...,
        buffer_size: int = ...,
        forward_port: int | None = ...,
    ) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> None: ...
    def get_buffer(self, sizehint: int) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def flush(self) -> None: ...
    def drop_stdout(self) -> None: ...

class ExecEncoder:
    """Client->server frames: always masked, FIN set, never fragmented."""

    @property
    def stdin_bytes(self) -> int: ...
    def __init__(
        self,
        *,
        max_frame_payload: int = ...,
        random_bytes: Callable[[int], bytes] = ...,
    ) -> None: ...
    def stdin(self, data: bytes | bytearray | memoryview) -> bytes: ...
    def stdin_many(self, chunks: Sequence[bytes | bytearray | memoryview]) -> bytes: ...
    def resize(self, width: int, height: int) -> bytes: ...
    def close_stdin(self) -> bytes: ...
    def ping(self, payload: bytes = ...) -> bytes: ...
    def pong(self, payload: bytes) -> bytes: ...
    def close(self, code: int = ..., reason: str = ...) -> bytes: ...
