"""Every failure a client sees, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `APIError`; `http.py` turns it (and anything unexpected) into that JSON
with the right status, so no response is ever a 422 or a plain-text 500.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse

from splitinfer.protocol import ErrorCode

if TYPE_CHECKING:
    from splitinfer.server.engine_client import EngineRequestError

logger = logging.getLogger(__name__)

# OpenAI's `type` for each status we produce.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def engine_unavailable(detail: str) -> APIError:
    return APIError(503, f"the engine is unavailable: {detail}", code="engine_unavailable")


def engine_request_error(exc: EngineRequestError, prompt_param: str) -> APIError:
    """The engine's refusal of one request: the client's fault (400), except when the engine
    failed while computing it (`internal`), which is ours (500). The engine names the prompt
    `prompt`; the client knows it as `prompt_param` (`messages` in a chat request)."""
    if exc.code == ErrorCode.INTERNAL:
        return APIError(500, f"the engine failed on this request: {exc}", code="engine_error")
    param = prompt_param if exc.param in ("prompt", "prompt_token_ids") else exc.param
    return bad_request(str(exc), param=param, code=str(exc.code))


def internal_error(exc: BaseException, where: str) -> APIError:
    """A bug of ours: logged with its traceback under a fresh incident id; the client gets the
    id and nothing else (no traceback, no paths)."""
    incident = uuid.uuid4().hex[:12]
    logger.error("internal error %s in %s", incident, where, exc_info=exc)
    return APIError(
        500, f"internal server error (incident {incident}); the server's log has the details", code="internal_error"
    )
