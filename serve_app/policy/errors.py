"""The one shape of every refusal: an HTTP status and an OpenAI error body."""

from __future__ import annotations

from typing import Any

# On every answer, refusals included. Not `x-request-id`: Ray Serve's proxy sets that one to its
# own id.
REQUEST_ID_HEADER = "x-pd-request-id"


def openai_error(status: int, message: str, err_type: str, param: str | None = None) -> dict:
    """`{"error": {message, type, param, code}}`, with the HTTP status as `code` (as vLLM's)."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


class Rejection(Exception):
    """A request refused by a policy before any engine sees it."""

    def __init__(
        self,
        status: int,
        message: str,
        err_type: str = "BadRequestError",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param
        self.headers = headers or {}

    @property
    def body(self) -> dict[str, Any]:
        return openai_error(self.status, self.message, self.err_type, self.param)


def capacity_rejection(retry_after_s: int, why: str) -> Rejection:
    """The 429 of bounded admission, wherever it is given (the Router's admission, a door)."""
    return Rejection(
        429,
        f"Too many requests: {why}; retry after {retry_after_s} s",
        "RateLimitError",
        headers={"Retry-After": str(retry_after_s)},
    )
