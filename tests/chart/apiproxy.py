"""A recording proxy in front of the API server: which (group, resource, verb) does a client use?

The operator is pointed at http://127.0.0.1:<port>; every request is forwarded unchanged
(its own Authorization header included: the proxy adds no credentials) to the real API server
over TLS, and its RBAC attributes are recorded. Watches stream through chunk by chunk. Together
with RBAC denying anything not granted, this proves least privilege both ways: what is used is
granted (else the request fails), and what is granted is used (the recorded set).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

Triple = tuple[str, str, str]
_HOP_BY_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
               "upgrade", "proxy-authorization", "proxy-authenticate", "content-length"}


def rbac_attributes(method: str, url: str) -> Triple | None:
    """The (apiGroup, resource[/subresource], verb) RBAC checks for a request, or None for
    non-resource paths (discovery: /api, /apis, /version...)."""
    parts = urlsplit(url)
    segs = [s for s in parts.path.split("/") if s]
    if segs[:1] == ["api"] and len(segs) >= 3:
        group, rest = "", segs[2:]
    elif segs[:1] == ["apis"] and len(segs) >= 4:
        group, rest = segs[1], segs[3:]
    else:
        return None
    if rest[0] == "namespaces" and len(rest) >= 3:
        rest = rest[2:]  # namespaced resource: drop "namespaces/<ns>"
    resource, name, sub = rest[0], rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
    query = parse_qs(parts.query)
    watching = query.get("watch", ["false"])[0].lower() in ("1", "true")
    verb = {
        "GET": "get" if name else ("watch" if watching else "list"),
        "POST": "create", "PUT": "update", "PATCH": "patch",
        "DELETE": "delete" if name else "deletecollection",
    }.get(method.upper(), method.lower())
    return group, f"{resource}/{sub}" if sub else resource, verb


@dataclass
class RecordingProxy:
    upstream: str                     # https://127.0.0.1:<port>
    ca_pem: str
    used: set[Triple] = field(default_factory=set)
    statuses: dict[Triple, set[int]] = field(default_factory=dict)
    port: int = 0

    def start(self) -> RecordingProxy:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True, name="api-proxy")
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("recording proxy did not start")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())
        self._loop.run_forever()

    async def _serve(self) -> None:
        ctx = ssl.create_default_context(cadata=self.ca_pem)
        self._session = ClientSession(connector=TCPConnector(ssl=ctx, limit=0),
                                      timeout=ClientTimeout(total=None, sock_read=None),
                                      auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        attrs = rbac_attributes(request.method, str(request.rel_url))
        if attrs is not None:
            self.used.add(attrs)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        body = await request.read()
        # Add nothing the client did not send (aiohttp would default a body's Content-Type to
        # application/octet-stream, which the API server refuses; it defaults to JSON itself).
        skip = {"Content-Type", "User-Agent", "Accept-Encoding", "Accept"} - {
            k.title() for k in request.headers}
        async with self._session.request(request.method, self.upstream + str(request.rel_url),
                                         headers=headers, data=body or None,
                                         skip_auto_headers=skip,
                                         allow_redirects=False) as upstream:
            if attrs is not None:
                self.statuses.setdefault(attrs, set()).add(upstream.status)
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP})
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except (ConnectionResetError, asyncio.CancelledError):
                pass  # the client closed a watch
            return response

    def stop(self) -> None:
        async def shutdown() -> None:
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(15)
