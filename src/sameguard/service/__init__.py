"""The HTTP service (FastAPI + uvicorn), its audit log and API keys, and its Python and ART clients.

Optional dependencies (``pip install 'sameguard[serve]'``): fastapi, uvicorn, sqlalchemy,
httpx, prometheus-client, python-multipart, pydantic; the ART adapter also needs
``adversarial-robustness-toolbox`` (``sameguard[art]``). Nothing is imported until used, so
``import sameguard`` and ``import sameguard.service`` stay light::

    from sameguard.service import ServiceSettings, create_app, SameguardClient

    app = create_app(ServiceSettings(victim="runs/victim", detector="runs/same", policy="reject"))
    api = SameguardClient("http://127.0.0.1:8000", api_key)      # a PredictionAPI over HTTP

Reference for the layout: the FastAPI single-node pattern (API-key header dependency, middleware,
SQLite in WAL mode behind a SQLAlchemy URL) described in the project's ecosystem notes.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "create_app",
    "ServiceSettings",
    "SameguardClient",
    "ServiceError",
    "RefusedError",
    "KeyStore",
    "ApiKey",
    "AuditLog",
    "summarize",
    "format_summary",
    "ServerThread",
    "load_guard",
    "to_art_classifier",
    "serve_main",
    "keys_main",
    "audit_main",
    "add_service_commands",
]

_LAZY = {
    "create_app": ".app",
    "ServiceSettings": ".settings",
    "SameguardClient": ".client",
    "ServiceError": ".client",
    "RefusedError": ".client",
    "KeyStore": ".keys",
    "ApiKey": ".keys",
    "AuditLog": ".audit",
    "summarize": ".audit",
    "format_summary": ".audit",
    "ServerThread": ".server",
    "load_guard": ".loading",
    "to_art_classifier": ".art",
    "serve_main": ".commands",
    "keys_main": ".commands",
    "audit_main": ".commands",
    "add_service_commands": ".commands",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
