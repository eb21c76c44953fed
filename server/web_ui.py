"""The chat page every server serves at `/` (`--no-web-ui` turns it off).

Plain HTML, CSS and JavaScript from `web/` beside this file, read once when the server
starts: no build step, nothing fetched from any other host (the page works offline). The
page talks to this server's own /v1 API, with the key the user types kept in the browser,
so it changes nothing about the API's authentication: the page itself is public, like
/health. Its Content-Security-Policy lets it load only its own script and stylesheet and
connect only to its own origin; with the page rendering model output as text, a model that
writes `<script>` can neither inject nor run it.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a restarted server with a newer page is seen at once
}
# URL path -> (file in web/, media type).
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
}


def _static(body: bytes, media_type: str):
    async def serve(request: Request) -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return serve


def routes() -> list[Route]:
    """GET (and HEAD) routes of the page's files, read now."""
    web = resources.files("splitinfer.server") / "web"
    return [
        Route(path, _static((web / name).read_bytes(), media_type), methods=["GET"])
        for path, (name, media_type) in FILES.items()
    ]
