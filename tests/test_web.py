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
