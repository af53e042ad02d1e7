"""The service's endpoints, one router per area: operations, prediction, proof-of-work, operators."""

from __future__ import annotations

from .admin import router as admin_router
from .ops import router as ops_router
from .pow import router as pow_router
from .predict import router as predict_router

__all__ = ["ops_router", "predict_router", "pow_router", "admin_router", "ROUTERS"]

#: In the order their paths appear in the OpenAPI document.
ROUTERS = (ops_router, predict_router, pow_router, admin_router)
