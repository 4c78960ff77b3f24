"""The frontend's own HTTP/1.1 server: asyncio + httptools, inference routes served natively,
everything else handed to the FastAPI app over ASGI.

`server.HttpServer` owns sockets, TLS, deadlines and shutdown; `protocol.HttpConnection` one
connection; `request.Request` one request and the handle the proxy answers it through
(`exchange.Exchange`); `asgi_bridge` runs an ASGI app (and its lifespan) on top of them;
`wire` holds the bytes they write.
"""

from corral.frontend.http.server import HttpLimits, HttpServer, bind_socket

__all__ = ["HttpLimits", "HttpServer", "bind_socket"]
