"""storage-sidecar: cloud object storage mounted into data-science sessions."""

__version__ = "0.1.0"
