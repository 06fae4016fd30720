"""The scanner reads the kernel, not the program: leakers in C, Node.js and Java are found the same way.

Each leaker accepts one connection on 127.0.0.1, reads until EOF and never closes it
(``eof-not-closed``, Recv-Q 0, role server). Skipped when the compiler or runtime is missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from closewait.model import Role
from tests.conftest import Spawn
from tests.scan.kit import close_wait_of
from tests.util import wait_for

C_LEAKER = r"""
#include <arpa/inet.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {
    int server = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (bind(server, (struct sockaddr *)&addr, sizeof addr) || listen(server, 8)) return 1;
    getsockname(server, (struct sockaddr *)&addr, &len);
    printf("%d\n", ntohs(addr.sin_port));
    fflush(stdout);
    int conn = accept(server, NULL, NULL);
    char buf[4096];
    while (read(conn, buf, sizeof buf) > 0) {}
    printf("eof\n");
    fflush(stdout);
    pause(); /* the bug: conn is never closed */
    return 0;
}
"""

NODE_LEAKER = r"""
const net = require("net");
// allowHalfOpen: node does not end the socket for us when the peer ends: the leak.
const server = net.createServer({ allowHalfOpen: true }, (sock) => {
  sock.on("data", () => {});
  sock.on("end", () => console.log("eof"));
});
server.listen(0, "127.0.0.1", () => console.log(server.address().port));
"""

JAVA_LEAKER = r"""
import java.io.InputStream;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.net.Socket;

public class Leaker {
    public static void main(String[] args) throws Exception {
        ServerSocket server = new ServerSocket(0, 8, InetAddress.getLoopbackAddress());
        System.out.println(server.getLocalPort());
        System.out.flush();
        Socket conn = server.accept();
        InputStream in = conn.getInputStream();
        byte[] buf = new byte[4096];
        while (in.read(buf) >= 0) {}
        System.out.println("eof");
        System.out.flush();
        Thread.sleep(120_000); // the bug: conn is never closed
    }
}
"""


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def _leaker_argv(language: str, tmp_path: Path) -> list[str]:
    if language == "c":
        _need("gcc")
        (tmp_path / "leaker.c").write_text(C_LEAKER)
        subprocess.run(["gcc", "-O1", "-o", str(tmp_path / "leaker"), str(tmp_path / "leaker.c")], check=True)
        return [str(tmp_path / "leaker")]
    if language == "node":
        _need("node")
        (tmp_path / "leaker.js").write_text(NODE_LEAKER)
        return ["node", str(tmp_path / "leaker.js")]
    _need("javac", "java")
    (tmp_path / "Leaker.java").write_text(JAVA_LEAKER)
    subprocess.run(["javac", "-d", str(tmp_path), str(tmp_path / "Leaker.java")], check=True, timeout=120)
    return ["java", "-Xshare:auto", "-XX:TieredStopAtLevel=1", "-cp", str(tmp_path), "Leaker"]


@pytest.mark.parametrize("language", ["c", "node", "java"])
def test_leaker_in_another_language(spawn: Spawn, tmp_path: Path, language: str) -> None:
    leaker = spawn(argv=_leaker_argv(language, tmp_path))
    assert leaker.stdout is not None
    port = int(leaker.stdout.readline())
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"request")
    assert leaker.stdout.readline().strip() == "eof"

    (finding,) = wait_for(lambda: [f for f in close_wait_of(leaker.pid, port) if f.socket.recv_q == 0])
    assert finding.role == Role.SERVER
    assert finding.diagnosis is not None
    assert finding.diagnosis.code == "eof-not-closed"
    (owner,) = finding.owners
    assert owner.process.pid == leaker.pid
    assert owner.process.cmdline[0] == _leaker_argv_name(language, tmp_path)


def _leaker_argv_name(language: str, tmp_path: Path) -> str:
    return {"c": str(tmp_path / "leaker"), "node": "node", "java": "java"}[language]
