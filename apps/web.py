"""HTTP-level guards for the app, as ASGI middleware on the FastAPI app that Gradio creates.

* :class:`SecurityHeaders`: every answer says ``X-Frame-Options: SAMEORIGIN``, ``Content-Security-Policy:
  frame-ancestors 'self'`` (no framing by other sites: clickjacking), ``X-Content-Type-Options: nosniff`` (a
  browser never runs an upload served back as something else) and ``Referrer-Policy: same-origin``.
* :class:`UploadLimit`: a ``POST .../upload`` carrying more than ``max_files`` files is refused with 413 while it
  streams in (Gradio's own upload route accepts up to 1000 files per request, without a session).

:func:`middleware` returns both for ``launch(app_kwargs={"middleware": ...})``.

:func:`checked_blocks` is ``gr.Blocks`` whose inputs are checked before Gradio's own preprocessing, so that a
number that is not one (``eps="abc"``, ``seed=NaN``) or a server path sent in place of an upload answers with
a clear message instead of Gradio's ``{"error": null}``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from guidance.method import finite

__all__ = ["SECURITY_HEADERS", "SecurityHeaders", "UploadLimit", "check_input", "checked_blocks", "middleware"]

SECURITY_HEADERS = {
    b"x-frame-options": b"SAMEORIGIN",
    b"content-security-policy": b"frame-ancestors 'self'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"same-origin",
}
#: at least one per file part of a multipart body, in any spelling python-multipart accepts (any case, any
#: spaces before "=", quoted or not, RFC 5987's filename*=): every "filename" counts, over-counting only refuses
#: a body that names more files than the limit anyway
FILE_PART = re.compile(rb"filename", re.IGNORECASE)
FILE_PART_TAIL = 8  # bytes kept from one chunk to the next: as long as a match, so a split one is found


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every HTTP answer that does not set them itself."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in SECURITY_HEADERS.items() if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class UploadLimit:
    """Refuses (413) an upload request with more than ``max_files`` file parts, counted as the body streams in."""

    def __init__(self, app: Any, max_files: int = 8) -> None:
        self.app, self.max_files = app, max_files

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/upload"):
            await self.app(scope, receive, send)
            return
        count, tail, refused, answered = 0, b"", False, False

        async def counting_receive() -> dict:
            nonlocal count, tail, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                data = tail + message.get("body", b"")
                # a match ending inside the tail was counted with the previous chunk
                count += sum(1 for m in FILE_PART.finditer(data) if m.end() > len(tail))
                tail = data[-FILE_PART_TAIL:]
                if count > self.max_files:
                    refused = True
                    return {"type": "http.disconnect"}  # the upload handler stops reading and stores nothing
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal answered
            if not refused:
                answered = True
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:
                raise
        if refused and not answered:
            body = json.dumps({"error": f"at most {self.max_files} files per upload request"}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": body})


def middleware(max_files: int) -> list:
    """Starlette ``Middleware`` entries for FastAPI's ``middleware=`` argument."""
    from starlette.middleware import Middleware

    return [Middleware(SecurityHeaders), Middleware(UploadLimit, max_files=max_files)]


def check_input(block: Any, value: Any) -> None:
    """Raise ``gr.Error`` naming ``block``'s label when ``value`` cannot be its input (numbers: finite)."""
    import gradio as gr

    if isinstance(block, gr.Number | gr.Slider) and value is not None:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, int | float) or not finite(number):
            label = block.label or type(block).__name__
            raise gr.Error(f"{label}: expected a finite number, got {str(value)[:40]!r}")


def check_files(block: Any, value: Any, max_files: int) -> None:
    """Raise ``gr.Error`` unless a ``gr.File`` input holds at most ``max_files`` files already on this server:
    Gradio would otherwise download every URL given as a file (unbounded in size and count) before any check."""
    import gradio as gr

    if not isinstance(block, gr.File) or value is None:
        return
    files = value if isinstance(value, list) else [value]
    if len(files) > max_files:
        raise gr.Error(f"at most {max_files} images per request, got {len(files)}")
    for entry in files:
        # Gradio reads a local path first (the browser sends its URL on this server beside it), else the URL
        path, url = (entry.get("path"), entry.get("url")) if isinstance(entry, dict) else (entry, None)
        source = path if isinstance(path, str) else url
        if isinstance(source, str) and "://" in source:
            raise gr.Error(
                "files must be uploaded to this server first (POST /gradio_api/upload, or gradio_client's "
                "handle_file); URLs are not fetched"
            )


def checked_blocks(max_files: int = 8, **kwargs: Any) -> Any:
    """A ``gr.Blocks(**kwargs)`` that checks every event's inputs (:func:`check_input`, :func:`check_files`) and
    turns the errors of Gradio's own preprocessing into clear ``gr.Error`` messages."""
    import gradio as gr
    from gradio.exceptions import InvalidPathError

    class CheckedBlocks(gr.Blocks):
        async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):
            for block, value in zip(block_fn.inputs, inputs):
                check_input(block, value)
                check_files(block, value, max_files)
            try:
                return await super().preprocess_data(block_fn, inputs, state, explicit_call)
            except InvalidPathError:
                raise gr.Error(
                    "files must be uploaded to this server first (POST /gradio_api/upload, or gradio_client's "
                    "handle_file); paths on the server are not accepted"
                ) from None
            except gr.Error:
                raise
            except (ValueError, TypeError) as error:  # pydantic's ValidationError is a ValueError
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise gr.Error(f"invalid input: {first[:200]}") from None

    return CheckedBlocks(**kwargs)
