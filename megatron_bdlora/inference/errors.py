"""API errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, each naming the request field at
fault: raised as APIError, or read from pydantic's validation errors (whose location is the field)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 409: "ConflictError", 413: "RequestTooLargeError",
                429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An answer in OpenAI's error shape: HTTP status, message and the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI / vLLM error JSON: {"error": {"message", "type", "param", "code"}} (also sent as an SSE event)."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "APIError"), "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An error answer with its HTTP status (and headers such as a 429's Retry-After)."""
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def validation_error(errors: list[dict]) -> APIError:
    """A 400 with one readable message for FastAPI's request validation errors, naming the top-level field at fault."""
    first = errors[0]
    loc = [str(part) for part in first["loc"] if part != "body"]
    if first["type"] == "json_invalid":
        at, why = loc[0] if loc else "?", first.get("ctx", {}).get("error", first["msg"])
        return APIError(400, f"malformed JSON body: {why} (at position {at})")
    if not loc:
        if first["type"] == "missing":
            return APIError(400, "the request body is missing: send a JSON object with Content-Type: application/json")
        return APIError(400, "the request body must be a JSON object (with Content-Type: application/json)")
    param = loc[0]
    if first["type"] == "missing":
        return APIError(400, f"'{'.'.join(loc)}' is a required field", param)
    got = repr(first.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    if sum(1 for e in errors if len(e["loc"]) > 1 and str(e["loc"][1]) == param) > 1:  # a union: every member failed
        kinds = sorted({str(e["loc"][2]) for e in errors if len(e["loc"]) > 2 and str(e["loc"][1]) == param})
        expected = f" (expected {' or '.join(kinds)})" if kinds else ""
        return APIError(400, f"'{param}' has the wrong type{expected}: got {got}", param)
    return APIError(400, f"'{'.'.join(loc)}': {first['msg']}, got {got}", param)
