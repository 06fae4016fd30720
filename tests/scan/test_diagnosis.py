"""Unit tests of the pure rules (closewait.diagnosis): Recv-Q/Send-Q/state/owners/role -> code and remedy.

These build Socket values by hand on purpose: the rules are a pure function, and the kernel-facing
tests (test_leaks, test_backends, test_netns) check that real sockets produce these inputs.
"""

from __future__ import annotations

import pytest

from closewait import diagnosis
from closewait.model import Endpoint, Family, Owner, Process, Role, Socket, TcpInfo, TcpState

SERVER_END = Endpoint("127.0.0.1", 8080)
CLIENT_END = Endpoint("127.0.0.1", 50000)
PROC = Process(pid=42, start_time=1, name="app", cmdline=("app",))
OWNER = (Owner(PROC, 7),)


def sock(
    state: TcpState = TcpState.CLOSE_WAIT,
    recv_q: int = 0,
    send_q: int = 0,
    local: Endpoint = SERVER_END,
    remote: Endpoint = CLIENT_END,
    idle_ms: int | None = None,
    family: Family = Family.IPV4,
) -> Socket:
    info = None
    if idle_ms is not None:
        info = TcpInfo(int(state), 0, 0, 0, 200000, 0, idle_ms, idle_ms, 10, 0, 0)
    return Socket(state, family, local, remote, inode=1, uid=0, recv_q=recv_q, send_q=send_q, tcp_info=info)


@pytest.mark.parametrize(
    ("recv_q", "code", "unread"),
    [(0, "eof-not-closed", 0), (1, "not-reading", 0), (2, "unread-data", 1), (5001, "unread-data", 5000)],
)
@pytest.mark.parametrize("role", list(Role))
def test_close_wait_code_follows_recv_q(recv_q: int, code: str, unread: int, role: Role) -> None:
    socket = sock(recv_q=recv_q, idle_ms=65000)
    result = diagnosis.diagnose(socket, OWNER if role != Role.UNKNOWN else (), role)
    assert result is not None
    assert result.code == code
    assert code in diagnosis.CODES
    assert socket.unread_bytes == unread
    assert result.summary
    assert result.remedy
    assert "\n" not in result.summary + result.remedy
    assert str(CLIENT_END) in result.summary
    if code != "unread-data":
        assert "1.1 min" in result.summary or "1 min" in result.summary  # idle since the FIN
    else:
        assert f"{unread} byte{'s' if unread != 1 else ''} sent by" in result.summary


def test_remedies_fit_code_and_role() -> None:
    def remedy(recv_q: int, role: Role) -> str:
        result = diagnosis.diagnose(sock(recv_q=recv_q), OWNER, role)
        assert result is not None
        return result.remedy

    assert "returns 0" in remedy(0, Role.SERVER)
    assert "pool" in remedy(0, Role.CLIENT)
    assert "epoll/selectors" in remedy(1, Role.SERVER)
    assert "idle timeout shorter than the server's keep-alive" in remedy(1, Role.CLIENT)
    assert "close the pool/session" in remedy(1, Role.CLIENT)
    assert "stuck" in remedy(9, Role.SERVER)
    assert "consumer" in remedy(9, Role.CLIENT)
    # The same code gets a different remedy for each role.
    for recv_q in (0, 1):
        assert len({remedy(recv_q, role) for role in Role}) == 3


def test_other_teardown_states() -> None:
    assert _code(sock(TcpState.FIN_WAIT2), ()) == "orphan-fin-wait-2"
    assert _code(sock(TcpState.FIN_WAIT2), OWNER) == "half-closed"
    assert _code(sock(TcpState.FIN_WAIT1, send_q=1), ()) is None  # only the FIN in flight
    assert _code(sock(TcpState.FIN_WAIT1, send_q=2), ()) == "peer-not-reading"
    assert _code(sock(TcpState.LAST_ACK, recv_q=1, send_q=1), ()) == "last-ack"
    assert _code(sock(TcpState.TIME_WAIT), ()) == "time-wait"
    assert _code(sock(TcpState.CLOSING, recv_q=1, send_q=1), ()) == "closing"
    for state in (TcpState.ESTABLISHED, TcpState.LISTEN, TcpState.SYN_SENT):
        assert _code(sock(state), OWNER) is None
    result = diagnosis.diagnose(sock(TcpState.FIN_WAIT1, send_q=2), (), Role.UNKNOWN)
    assert result is not None
    assert result.summary.startswith("1 byte still queued")
    # FIN counted once in LAST_ACK and CLOSING too: Recv-Q 1 is no unread data.
    assert sock(TcpState.LAST_ACK, recv_q=1).unread_bytes == 0
    assert sock(TcpState.CLOSING, recv_q=3).unread_bytes == 2
    assert sock(TcpState.ESTABLISHED, recv_q=3).unread_bytes == 3


def _code(socket: Socket, owners: tuple[Owner, ...]) -> str | None:
    role = Role.CLIENT if owners else Role.UNKNOWN
    result = diagnosis.diagnose(socket, owners, role)
    return result.code if result else None


@pytest.mark.parametrize(
    ("listener", "local", "role"),
    [
        (Endpoint("0.0.0.0", 8080), Endpoint("127.0.0.1", 8080), Role.SERVER),
        (Endpoint("::", 8080), Endpoint("::ffff:127.0.0.1", 8080), Role.SERVER),  # dual-stack
        (Endpoint("127.0.0.1", 8080), Endpoint("::ffff:127.0.0.1", 8080), Role.SERVER),
        (Endpoint("127.0.0.1", 8080), Endpoint("127.0.0.1", 8080), Role.SERVER),
        (Endpoint("127.0.0.2", 8080), Endpoint("127.0.0.1", 8080), Role.CLIENT),  # another address
        (Endpoint("127.0.0.1", 9090), Endpoint("127.0.0.1", 8080), Role.CLIENT),  # another port
    ],
)
def test_role_of(listener: Endpoint, local: Endpoint, role: Role) -> None:
    socket = sock(local=local)
    assert diagnosis.role_of(socket, OWNER, [(PROC.pid, listener)]) == role
    # A listener of another process on that port does not make this process the server ...
    assert diagnosis.role_of(socket, OWNER, [(PROC.pid + 1, listener)]) == Role.CLIENT
    # ... unless the host-wide port check says the port is served here (accept in one process,
    # serve in another).
    assert diagnosis.role_of(socket, OWNER, [], host_listening_ports={local.port}) == Role.SERVER
    assert diagnosis.role_of(socket, (), [(PROC.pid, listener)]) == Role.UNKNOWN


@pytest.mark.parametrize(
    ("recv_q", "idle_ms", "age_ms", "remote", "summary"),
    [
        (
            0,
            65000,
            None,
            CLIENT_END,
            "read() returned 0 (EOF) after 127.0.0.1:50000 closed 1 min ago, but it has not been closed",
        ),
        (0, None, None, CLIENT_END, "read() returned 0 (EOF) after 127.0.0.1:50000 closed, but it has not been closed"),
        (1, 500, None, Endpoint("::1", 4000), "[::1]:4000 closed 500 ms ago and nothing has read this socket since"),
        (1, 500, 90000, Endpoint("::1", 4000), "[::1]:4000 closed 2 min ago and nothing has read this socket since"),
        (
            0,
            7_200_000,
            1200,
            Endpoint("::ffff:10.0.0.1", 443),
            "read() returned 0 (EOF) after [::ffff:10.0.0.1]:443 closed 1.2 s ago, but it has not been closed",
        ),
        (5, 500, None, CLIENT_END, "4 bytes sent by 127.0.0.1:50000 before it closed were never read"),
        (2, 500, None, Endpoint("::1", 1), "1 byte sent by [::1]:1 before it closed were never read"),
    ],
)
def test_close_wait_summaries_word_for_word(
    recv_q: int, idle_ms: int | None, age_ms: int | None, remote: Endpoint, summary: str
) -> None:
    """The exact texts (programs and people read them), the same from ``diagnose`` and from the scan's
    ``diagnose_close_wait`` (given the exact age, else the idle time), the same again when its
    phrase for the age was made before."""
    socket = sock(recv_q=recv_q, remote=remote, idle_ms=idle_ms)
    for _ in range(2):
        assert (found := diagnosis.diagnose(socket, OWNER, Role.SERVER, age_ms)) is not None
        assert found.summary == summary
        direct = diagnosis.diagnose_close_wait(socket, Role.SERVER, age_ms if age_ms is not None else idle_ms)
        assert direct == found
