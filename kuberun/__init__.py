"""kuberun: give every SSH user their own Kubernetes Pod."""

__version__ = "0.1.0"
