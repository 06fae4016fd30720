"""The commonest client-side leak: a connection pool keeps idle keep-alive connections that the
server has since closed. Nobody reads a pooled idle socket, so the server's FIN sits in Recv-Q
(Recv-Q 1): CLOSE_WAIT, role client, ``not-reading``.
"""

from __future__ import annotations

import pytest

from closewait.model import Role
from tests.conftest import Spawn
from tests.scan.kit import close_wait_of, python_argv

#: HTTP/1.1 keep-alive server that closes a connection after 0.3 s without a request.
KEEPALIVE_SERVER = """
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 0.3  # idle keep-alive connections are closed after this
    def do_GET(self):
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

CLIENTS = {
    "requests": """
import sys, time, requests
session = requests.Session()
for _ in range(2):
    assert session.get(f"http://127.0.0.1:{sys.argv[1]}/").text == "hello"
print("done", flush=True)
time.sleep(120)  # the session (and its pool) stays open
""",
    "urllib3": """
import sys, time, urllib3
pool = urllib3.PoolManager()
for _ in range(2):
    assert pool.request("GET", f"http://127.0.0.1:{sys.argv[1]}/").data == b"hello"
print("done", flush=True)
time.sleep(120)
""",
}


@pytest.mark.parametrize("library", sorted(CLIENTS))
def test_pooled_client_whose_server_closed_idle_connection(spawn: Spawn, library: str) -> None:
    server = spawn(argv=python_argv(KEEPALIVE_SERVER))
    assert server.stdout is not None
    port = int(server.stdout.readline())
    client = spawn(argv=python_argv(CLIENTS[library], port))
    assert client.stdout is not None
    assert client.stdout.readline().strip() == "done"

    # One pooled connection, reused for both requests, closed by the server after its keep-alive.
    (finding,) = close_wait_of(client.pid, port)
    assert finding.socket.remote.port == port
    assert finding.socket.recv_q == 1
    assert finding.role == Role.CLIENT
    assert [o.process.pid for o in finding.owners] == [client.pid]
    assert finding.diagnosis is not None
    assert finding.diagnosis.code == "not-reading"
    assert "idle timeout shorter than the server's keep-alive" in finding.diagnosis.remedy
