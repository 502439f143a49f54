"""`simsearch serve`: a FastAPI app (JSON API + a static page) over one warm `Index`."""

from .app import bind_warning, create_app

__all__ = ["bind_warning", "create_app"]
