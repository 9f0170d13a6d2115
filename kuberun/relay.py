"""The Kubernetes exec and port-forward relay codec: the Cython or the pure-Python one.

* ``KUBERUN_NO_EXTENSIONS=1`` forces the pure-Python twin.
* ``KUBERUN_REQUIRE_EXTENSIONS=1`` makes a missing or broken extension an
  ``ImportError`` instead of a fallback (CI sets it, so the Cython half is
  never silently skipped).
* Otherwise the extension is used when it imports, and the pure-Python twin
  (with a warning) when it does not.

:data:`IMPLEMENTATION` says which one was chosen. Both modules stay importable
directly (``kuberun._relay``, ``kuberun._relay_py``) for tests and benchmarks.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import TYPE_CHECKING, Literal

from kuberun._relay_common import ExecSink, PortForwardSink

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "DEFAULT_MAX_STATUS",
    "IMPLEMENTATION",
    "PROTOCOL_V1",
    "PROTOCOL_V4",
    "PROTOCOL_V5",
    "ExecDecoder",
    "ExecEncoder",
    "ExecSink",
    "PortForwardSink",
    "decode_status",
]

_log = logging.getLogger(__name__)


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


IMPLEMENTATION: Literal["cython", "python"]

if TYPE_CHECKING:
    from kuberun._relay import (
        DEFAULT_MAX_PAYLOAD,
        DEFAULT_MAX_STATUS,
        PROTOCOL_V1,
        PROTOCOL_V4,
        PROTOCOL_V5,
        ExecDecoder,
        ExecEncoder,
        decode_status,
    )

    IMPLEMENTATION = "cython"
elif _flag("KUBERUN_NO_EXTENSIONS"):
    from kuberun._relay_py import (
        DEFAULT_MAX_PAYLOAD,
        DEFAULT_MAX_STATUS,
        PROTOCOL_V1,
        PROTOCOL_V4,
        PROTOCOL_V5,
        ExecDecoder,
        ExecEncoder,
        decode_status,
    )

    IMPLEMENTATION = "python"
else:
    try:
        from kuberun._relay import (
            DEFAULT_MAX_PAYLOAD,
            DEFAULT_MAX_STATUS,
            PROTOCOL_V1,
            PROTOCOL_V4,
            PROTOCOL_V5,
            ExecDecoder,
            ExecEncoder,
            decode_status,
        )

        IMPLEMENTATION = "cython"
    except ImportError as exc:
        if _flag("KUBERUN_REQUIRE_EXTENSIONS"):
            raise ImportError(
                "KUBERUN_REQUIRE_EXTENSIONS is set but the Cython relay kuberun._relay "
                f"cannot be imported ({exc}); build it with "
                "'python setup.py build_ext --inplace'"
            ) from exc
        _message = (
            f"kuberun: the Cython relay is unavailable ({exc}); using the slower pure-Python relay"
        )
        warnings.warn(_message, RuntimeWarning, stacklevel=2)
        _log.warning("%s", _message)
        from kuberun._relay_py import (
            DEFAULT_MAX_PAYLOAD,
            DEFAULT_MAX_STATUS,
            PROTOCOL_V1,
            PROTOCOL_V4,
            PROTOCOL_V5,
            ExecDecoder,
            ExecEncoder,
            decode_status,
        )

        IMPLEMENTATION = "python"
