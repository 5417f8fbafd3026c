"""The app's HTTP guards (apps/web.py) on a bare Starlette app: security headers, and uploads of too many files
refused with 413 while they stream in."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from apps.web import SECURITY_HEADERS, middleware


def _client(max_files: int = 2) -> tuple[TestClient, list[int]]:
    stored: list[int] = []

    async def upload(request):
        form = await request.form()
        files = form.getlist("files")
        stored.append(len(files))
        return JSONResponse([f.filename for f in files])

    async def page(request):
        return JSONResponse({"ok": True}, headers={"X-Frame-Options": "DENY"})

    routes = [Route("/gradio_api/upload", upload, methods=["POST"]), Route("/", page)]
    app = Starlette(routes=routes, middleware=[Middleware(m.cls, *m.args, **m.kwargs) for m in middleware(max_files)])
    return TestClient(app), stored


def test_security_headers_are_added_unless_set():
    client, _ = _client()
    response = client.get("/")
    assert response.headers["x-frame-options"] == "DENY"  # the app's own value wins
    for name, value in SECURITY_HEADERS.items():
        if name != b"x-frame-options":
            assert response.headers[name.decode()] == value.decode()
    assert client.get("/missing").headers["x-content-type-options"] == "nosniff"


def test_uploads_beyond_the_file_count_are_refused():
    client, stored = _client(max_files=2)
    two = [("files", (f"{i}.png", b"x" * 100, "image/png")) for i in range(2)]
    assert client.post("/gradio_api/upload", files=two).json() == ["0.png", "1.png"]
    many = [("files", (f"{i}.png", b"x" * 100, "image/png")) for i in range(50)]
    response = client.post("/gradio_api/upload", files=many)
    assert response.status_code == 413 and "at most 2 files" in response.json()["error"]
    assert stored == [2]  # the refused request stored nothing


def _multipart(n: int, header: str) -> tuple[bytes, str]:
    boundary = "XyZboundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; {header.format(i=i)}\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + b"x" * 100
        + b"\r\n"
        for i in range(n)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_every_spelling_of_a_file_part_counts():
    """python-multipart reads filename in any case, with spaces before '=', quoted or not: each is a file."""
    spellings = ('filename="{i}.png"', "filename={i}.png", 'FILENAME="{i}.png"', 'filename ="{i}.png"')
    for header in (*spellings, "filename" + " " * 17 + '="{i}.png"', "filename\t \t  \t=x{i}"):
        client, stored = _client(max_files=2)
        body, kind = _multipart(50, header)
        response = client.post("/gradio_api/upload", content=body, headers={"content-type": kind})
        assert response.status_code == 413, header
        assert stored == [], header
        body, kind = _multipart(2, header)
        assert client.post("/gradio_api/upload", content=body, headers={"content-type": kind}).status_code == 200


def test_file_inputs_are_uploads_on_this_server_never_urls_and_few():
    import gradio as gr
    import pytest

    from apps.web import check_files

    files = gr.File(file_count="multiple")
    upload = {"path": "/tmp/gradio/abc/x.png", "url": "http://127.0.0.1:7860/gradio_api/file=/tmp/gradio/abc/x.png"}
    check_files(files, [upload] * 8, max_files=8)  # what a browser or gradio_client sends
    with pytest.raises(gr.Error, match="at most 8 images per request, got 9"):
        check_files(files, [upload] * 9, max_files=8)
    for remote in ({"path": "https://example.com/huge.bin"}, {"path": "http://10.0.0.1/x.png", "url": None}):
        with pytest.raises(gr.Error, match="URLs are not fetched"):
            check_files(files, [upload, remote], max_files=8)
    check_files(gr.Number(), "https://example.com", max_files=8)  # other inputs: not files


def test_a_number_too_large_for_a_float_is_a_message_not_a_blank_error():
    import gradio as gr
    import pytest

    from apps.web import check_input

    seed = gr.Number(label="seed")
    for huge in (10**400, -(10**400), "1" + "0" * 400):
        with pytest.raises(gr.Error, match="seed: expected a finite number"):
            check_input(seed, huge)
    check_input(seed, 10**15)
