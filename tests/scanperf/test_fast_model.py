"""The scan's fast paths build the same model objects as the public constructors.

``closewait._records.make_*`` fill a frozen dataclass's slots directly, and the netlink parser
shares one Endpoint object per (address, port). These tests check the objects are
indistinguishable from ``Class(...)``'s (equal, same hash, still frozen), that each constructor
takes exactly its class's fields (so a field added to a class fails here, not silently), and that a
real kernel reply parsed in place matches the socket the kernel reports for the same connection.
"""

from __future__ import annotations

import dataclasses
import inspect
import socket
from collections.abc import Callable
from typing import Any

import pytest

from closewait import _records
from closewait.model import (
    Age,
    AgeSource,
    Diagnosis,
    Endpoint,
    Family,
    Finding,
    Owner,
    Process,
    Role,
    Socket,
    TcpInfo,
    TcpState,
)
from closewait.sources import netlink
from tests.util import wait_for

INFO = TcpInfo(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, None)
LOCAL = Endpoint("127.0.0.1", 8080)
REMOTE = Endpoint("::ffff:127.0.0.2", 40000)
SOCK = Socket(TcpState.CLOSE_WAIT, Family.IPV4, LOCAL, REMOTE, 77, 0, 1, 0, 99, INFO, "netlink")
DIAG = Diagnosis("not-reading", "summary", "remedy")
AGE = Age(1_700_000_000.25, 1500, AgeSource.EXACT)
OWNER = Owner(Process(4321, 99, "python", ("python", "-m", "app")), 7)


@pytest.mark.parametrize(
    ("make", "value"),
    [
        (_records.make_endpoint, LOCAL),
        (_records.make_tcp_info, INFO),
        (_records.make_socket, SOCK),
        (_records.make_diagnosis, DIAG),
        (_records.make_finding, Finding(SOCK, (), Role.UNKNOWN, DIAG)),
        (_records.make_finding, Finding(SOCK, (), Role.UNKNOWN, DIAG, AGE)),
        (_records.make_age, AGE),
        (_records.make_owner, OWNER),
    ],
)
def test_fast_constructors_build_the_same_frozen_objects(make: Any, value: Any) -> None:
    built = make(*(getattr(value, f.name) for f in dataclasses.fields(value)))
    assert type(built) is type(value)
    assert built == value
    assert hash(built) == hash(value)
    assert repr(built) == repr(value)
    first = dataclasses.fields(value)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(built, first, None)


def test_fast_constructor_refuses_a_missing_field() -> None:
    with pytest.raises(TypeError):
        _records.make_endpoint("127.0.0.1")  # type: ignore[call-arg]


CONSTRUCTED: dict[str, type[Any]] = {
    "make_endpoint": Endpoint,
    "make_tcp_info": TcpInfo,
    "make_socket": Socket,
    "make_diagnosis": Diagnosis,
    "make_finding": Finding,
    "make_age": Age,
    "make_owner": Owner,
}


def test_every_fast_constructor_is_checked_here() -> None:
    assert sorted(name for name in vars(_records) if name.startswith("make_")) == sorted(CONSTRUCTED)


@pytest.mark.parametrize("name", sorted(CONSTRUCTED))
def test_fast_constructor_takes_its_classs_fields_in_order(name: str) -> None:
    """Same names, same order, same annotations, no defaults: a field added to the class (or
    reordered, or retyped) fails here until the constructor follows it."""
    make: Callable[..., object] = getattr(_records, name)
    cls = CONSTRUCTED[name]
    parameters = list(inspect.signature(make).parameters.values())
    assert [(p.name, p.annotation) for p in parameters] == [(f.name, f.type) for f in dataclasses.fields(cls)]
    assert all(p.default is inspect.Parameter.empty for p in parameters)
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters)
    assert inspect.signature(make).return_annotation == cls.__name__
    # Every slot is filled: a field the constructor forgot would be missing from its object.
    value = make(*(object() for _ in parameters))
    for field in dataclasses.fields(cls):
        getattr(value, field.name)


def test_parsed_sockets_share_their_servers_endpoint() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    accepted = [server.accept()[0] for _ in clients]
    try:
        client_ports = {c.getsockname()[1] for c in clients}
        for client in clients:
            client.close()  # the accepted ends go to CLOSE_WAIT: a small dump, far below the cache's bound

        def mine() -> list[Socket]:
            return [
                s
                for s in netlink.dump({TcpState.CLOSE_WAIT}, families=(Family.IPV4,))
                if s.local.port == port and s.remote.port in client_ports
            ]

        wait_for(lambda: len(mine()) == 3)
        for cache in netlink._ENDPOINT_CACHES.values():
            cache.clear()  # a full cache is emptied mid-dump; start this one empty
        found = mine()
        assert {s.remote.port for s in found} == client_ports
        assert all(s.local == Endpoint("127.0.0.1", port) for s in found)
        assert len({id(s.local) for s in found}) == 1  # one shared object, equal to a fresh one
        assert all(s.tcp_info is not None and s.tcp_info.state == TcpState.CLOSE_WAIT for s in found)
    finally:
        for sock in (*clients, *accepted, server):
            sock.close()
