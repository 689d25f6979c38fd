"""Input limits and validation for the HTTP API beyond the pydantic models (`models.py`): body size, images,
keys and label names. Nothing a client sends is ever used as a file-system path (ids are ints, keys are
generated or matched against a strict pattern).
"""
from __future__ import annotations

import io
import re
import uuid
from typing import Any, Optional


# Keys and sources become metadata strings (never paths), but a strict alphabet keeps them safe to show and
# to log, and keeps `..`/slashes out of anything a later layer might join onto a URL.
TOKEN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
LABEL_NAME_RE = re.compile(r"^[^\x00-\x1f/\\]{1,128}$")
MAX_IMAGE_PIXELS = 40_000_000


class ApiError(Exception):
    """An HTTP error answered as JSON `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 for bodies over `max_bytes`, by Content-Length or while streaming.

    Counting the streamed bytes as well as the header matters: a chunked upload has no Content-Length.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await _send_json(send, 413, self._message())
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, self._message())
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except ApiError as e:
            if started:
                raise
            await _send_json(send, e.status, e.message)

    def _message(self) -> str:
        return f"request body larger than the limit of {self.max_bytes} bytes (serve.max_request_bytes)"


async def _send_json(send, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def parse_image(data: bytes):
    """A decoded RGB PIL image from uploaded bytes; 422 when the bytes are not an image Pillow can read."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(422, "the uploaded image is empty")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            if probe.width * probe.height > MAX_IMAGE_PIXELS:
                raise ApiError(422, f"image is {probe.width}x{probe.height}: more than {MAX_IMAGE_PIXELS} pixels")
            probe.verify()  # checks structure without a full decode
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError(422, f"the upload is not a readable image ({type(e).__name__}); send a PNG, JPEG, "
                            "GIF, WebP or another format Pillow reads")


def parse_token(value: Any, name: str) -> str:
    """A short identifier-like string (keys, sources): letters, digits and . _ : - only."""
    if not isinstance(value, str) or not TOKEN_RE.match(value):
        raise ApiError(422, f"{name} must be 1-128 characters of letters, digits and . _ : - "
                            f"(starting with a letter or digit), got {value!r}")
    return value


def parse_label_name(value: Any) -> Optional[str]:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not LABEL_NAME_RE.match(value):
        raise ApiError(422, "label_name must be 1-128 printable characters without slashes")
    return value


def new_key(prefix: str = "api") -> str:
    """A fresh key for an item added through the API (the id is derived from it by the memory layer)."""
    return f"{prefix}-{uuid.uuid4().hex}"
