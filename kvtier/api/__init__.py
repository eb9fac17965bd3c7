"""The kvtier service (FastAPI) and its Python client."""

from kvtier.api.app import create_app
from kvtier.api.client import APIError, AsyncClient, Client

__all__ = ["APIError", "AsyncClient", "Client", "create_app"]
