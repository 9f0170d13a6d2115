"""kuberun: give every SSH user their own Kubernetes Pod.

Embed it in an asyncssh server with :class:`SSHServer` and :class:`Gateway`,
or drive the per-connection hooks yourself with :func:`new`.
"""

from .config import Config, config_from_dict, load_config, make_api_client
from .errors import KuberunError
from .handler import NetworkHandler, SSHConnectionHandler, new
from .server import Gateway, SSHServer, server_options

__version__ = "0.1.0"

__all__ = [
    "Config",
    "Gateway",
    "KuberunError",
    "NetworkHandler",
    "SSHConnectionHandler",
    "SSHServer",
    "config_from_dict",
    "load_config",
    "make_api_client",
    "new",
    "server_options",
]
