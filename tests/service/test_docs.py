"""/docs and /redoc work offline: every asset their pages reference comes from the server."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import LiveServer

# A URL in JavaScript: `url: '/openapi.json'` or `window.location.origin + '/docs/...'`.
JS_PATH = re.compile(r"""['"](/[^'"\s]*)['"]""")
LINK_ATTRIBUTES = {"src", "href", "spec-url"}


class References(HTMLParser):
    """Every URL an HTML page makes the browser fetch: attributes, and paths in inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in LINK_ATTRIBUTES and value]
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.urls += JS_PATH.findall(data)


def fetch(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers.get("content-type", ""), response.read()


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        pytest.param(
            "/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "openapi.json"}, id="swagger"
        ),
        pytest.param("/redoc", {"redoc.standalone.js", "openapi.json"}, id="redoc"),
    ],
)
def test_docs_page_and_every_asset_come_from_the_server(
    server: LiveServer, page: str, expected: set[str]
) -> None:
    status, kind, body = fetch(server.http_url + page)
    assert status == 200 and kind.startswith("text/html")
    html = body.decode()
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    parser = References()
    parser.feed(html)
    assert expected <= {url.rsplit("/", 1)[-1] for url in parser.urls}
    for url in parser.urls:
        assert url.startswith("/") and not url.startswith("//"), url
        status, kind, asset = fetch(server.http_url + url)
        assert status == 200 and asset, url
        if url.endswith(".js"):
            assert "javascript" in kind and len(asset) > 100_000  # the whole bundle
        if url.endswith(".css"):
            assert kind.startswith("text/css")


def test_docs_need_no_api_key(make_server: Callable[..., LiveServer]) -> None:
    server = make_server(api_keys=["secret"])
    for path in ("/docs", "/redoc", "/docs-assets/swagger-ui.css", "/openapi.json"):
        assert fetch(server.http_url + path)[0] == 200
