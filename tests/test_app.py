"""The app started as the README starts it (on the embedded demo DiT), called through its API like a program."""

from __future__ import annotations

import socket

import pytest

from apps.cli import main as cli_main
from apps.demo import DEMO_DIR

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "dit").is_dir(), reason="the demo DiT is not in demo_models/")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    from apps.app import build_app

    app = build_app("demo/dit", device="cpu")
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_generate_endpoint_and_a_bad_request(server):
    from gradio_client import Client
    from PIL import Image

    client = Client(server, verbose=False)
    image, caption = client.predict("star", "apg", 6, 0, None, -0.5, "pag", 2, 1, 4, 0, 2, True, api_name="/generate")
    grid = Image.open(image)
    assert grid.size == (2 * 256, 4 * 256)  # 2 images x (none, cfg, apg, the chosen one), 32 px shown 8x
    assert "row 4: apg 6 + pag 2 + 1 corrector step(s)" in caption
    with pytest.raises(Exception, match=r"not in the list of choices|unknown class"):
        client.predict("unicorn", "apg", 6, 0, None, -0.5, "none", 2, 0, 4, 0, 2, False, api_name="/generate")
    with pytest.raises(Exception, match=r"less than minimum|steps must be between"):
        client.predict("disc", "cfg", 3, 0, None, -0.5, "none", 2, 0, 0, 1, 1, False, api_name="/generate")
    image, _ = client.predict("disc", "cfg", 3, 0, None, -0.5, "tpg", 2, 0, 2, 1, 1, False, api_name="/generate")
    assert Image.open(image).size[0] > 0  # still answering


def test_cli_generate_writes_new_files_only(tmp_path):
    args = ["generate", "ring", "--steps", "2", "--num-images", "1", "--out", str(tmp_path), "--device", "cpu"]
    assert cli_main(args) == 0
    assert cli_main(args) == 0
    assert len(list(tmp_path.glob("*.png"))) == 2  # the second run did not overwrite the first
    assert cli_main([*args[:1], "unicorn", *args[2:]]) == 2
