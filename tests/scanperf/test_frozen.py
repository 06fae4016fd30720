"""The model's classes, made by ``closewait._frozen.dataclass``, behave as ``dataclasses.dataclass`` makes them.

Each model class is compared with a twin the plain decorator makes from the same fields, defaults,
name and docstring: the same metadata (fields, params, signature, slots, match args), and for the same
values the same repr, hash, equality, ordering, frozen errors, pickling, copying and ``dataclasses``
helpers. A fresh interpreter checks that what is never used is never compiled.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import subprocess
import sys
import threading
from typing import Any

import pytest

from closewait import _frozen, model
from closewait.sources import netns

MODEL_CLASSES = [
    value
    for module in (model, netns)
    for value in vars(module).values()
    if isinstance(value, type) and "__dataclass_fields__" in vars(value)
]


def test_every_model_dataclass_is_made_here() -> None:
    names = {cls.__name__ for cls in MODEL_CLASSES}
    assert {"Endpoint", "TcpInfo", "Socket", "Process", "Owner", "Diagnosis", "Age", "Finding", "Snapshot"} <= names
    assert {"Netns", "Unreadable", "Survey"} <= names
    assert len(MODEL_CLASSES) == 14
    assert all(cls.__setattr__.__module__ == "closewait._frozen" for cls in MODEL_CLASSES)


def _twin(cls: type) -> Any:
    """The class ``@dataclasses.dataclass(frozen=True, slots=True, order=...)`` makes of ``cls``'s fields."""
    namespace: dict[str, Any] = {"__annotations__": {}, "__module__": cls.__module__, "__doc__": cls.__doc__}
    for f in dataclasses.fields(cls):
        namespace["__annotations__"][f.name] = f.type
        options = {"compare": f.compare, "repr": f.repr}
        if f.default is not dataclasses.MISSING:
            namespace[f.name] = dataclasses.field(default=f.default, **options)
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f.name] = dataclasses.field(default_factory=f.default_factory, **options)
        elif not (f.compare and f.repr):
            namespace[f.name] = dataclasses.field(**options)
    twin = type(cls.__name__, (), namespace)
    twin.__qualname__ = cls.__qualname__
    order = cls.__dataclass_params__.order  # type: ignore[attr-defined]
    return dataclasses.dataclass(frozen=True, slots=True, order=order)(twin)


def _field_facts(cls: type) -> list[tuple[Any, ...]]:
    return [
        (f.name, f.type, f.default, f.default_factory, f.init, f.repr, f.hash, f.compare, f.kw_only, f._field_type)  # type: ignore[attr-defined]
        for f in dataclasses.fields(cls)
    ]


@pytest.mark.parametrize("cls", MODEL_CLASSES, ids=lambda cls: cls.__name__)
def test_the_metadata_is_dataclasses_own(cls: type) -> None:
    twin = _twin(cls)
    assert dataclasses.is_dataclass(cls)
    assert _field_facts(cls) == _field_facts(twin)
    assert repr(cls.__dataclass_params__) == repr(twin.__dataclass_params__)  # type: ignore[attr-defined]
    assert str(inspect.signature(cls)) == str(inspect.signature(twin))
    assert cls.__slots__ == twin.__slots__  # type: ignore[attr-defined]
    assert cls.__match_args__ == twin.__match_args__  # type: ignore[attr-defined]
    assert cls.__doc__ == twin.__doc__
    assert cls.__init__.__qualname__ == twin.__init__.__qualname__  # type: ignore[misc]
    for name in ("__eq__", "__hash__", "__repr__", "__lt__", "__setattr__", "__getstate__"):
        assert (getattr(cls, name) is getattr(object, name, None)) == (
            getattr(twin, name) is getattr(object, name, None)
        )
    assert not hasattr(cls(*_values(cls, 0)), "__dict__")


def _values(cls: type, seed: int) -> list[Any]:
    """Values for every field: numbers where order is compared, strings elsewhere."""
    return [seed * 10 + i if i % 2 else f"{seed}-{i}" for i, _ in enumerate(dataclasses.fields(cls))]


def _outcome(action: Any) -> tuple[str, str]:
    try:
        return ("value", repr(action()))
    except Exception as err:  # the error's type and text are what is compared
        return (type(err).__name__, str(err))


@pytest.mark.parametrize("cls", MODEL_CLASSES, ids=lambda cls: cls.__name__)
def test_instances_behave_as_dataclasses_instances(cls: type) -> None:
    twin = _twin(cls)
    for kind in (cls, twin):
        assert kind is not None
    mine = [cls(*_values(cls, seed)) for seed in (0, 0, 1)]
    theirs = [twin(*_values(cls, seed)) for seed in (0, 0, 1)]
    assert [repr(x) for x in mine] == [repr(x) for x in theirs]
    assert [hash(x) for x in mine] == [hash(x) for x in theirs]
    pairs = [(a, b) for a in range(3) for b in range(3)]
    assert [mine[a] == mine[b] for a, b in pairs] == [theirs[a] == theirs[b] for a, b in pairs]
    assert [mine[a] != mine[b] for a, b in pairs] == [theirs[a] != theirs[b] for a, b in pairs]
    assert (mine[0] == theirs[0]) is False
    assert (mine[0] == _values(cls, 0)) is False
    for compare in ("__lt__", "__le__", "__gt__", "__ge__"):
        mine_result = [_outcome(lambda a=a, b=b, c=compare: getattr(mine[a], c)(mine[b])) for a, b in pairs]
        assert mine_result == [_outcome(lambda a=a, b=b, c=compare: getattr(theirs[a], c)(theirs[b])) for a, b in pairs]
    first = dataclasses.fields(cls)[0].name
    assert _outcome(lambda: setattr(mine[0], first, 1)) == _outcome(lambda: setattr(theirs[0], first, 1))
    assert _outcome(lambda: delattr(mine[0], first)) == _outcome(lambda: delattr(theirs[0], first))
    assert _outcome(lambda: setattr(mine[0], first, 1))[0] == "FrozenInstanceError"
    # A name that is no field fails too. Python 3.11's own slotted __setattr__ fails there with a
    # TypeError from super() (its closure names the class before slots were added); this one says
    # FrozenInstanceError, as it does for a field (and as an AttributeError, what slots raise).
    for change in (lambda x: setattr(x, "not_a_field", 1), lambda x: delattr(x, "not_a_field")):
        assert _outcome(lambda change=change: change(mine[0]))[0] == "FrozenInstanceError"
        assert _outcome(lambda change=change: change(theirs[0]))[0] != "value"
    assert pickle.loads(pickle.dumps(mine[0])) == mine[0]
    assert copy.copy(mine[2]) == mine[2]
    assert copy.deepcopy(mine[2]) == mine[2]
    assert dataclasses.asdict(mine[2]) == dataclasses.asdict(theirs[2])
    assert dataclasses.astuple(mine[2]) == dataclasses.astuple(theirs[2])
    assert repr(dataclasses.replace(mine[0], **{first: 5})) == repr(dataclasses.replace(theirs[0], **{first: 5}))
    assert _outcome(cls) == _outcome(twin)
    assert _outcome(lambda: cls(*_values(cls, 0), 99)) == _outcome(lambda: twin(*_values(cls, 0), 99))
    # An object inside its own field: the recursive repr's "...".
    looped, twin_looped = cls(*_values(cls, 3)), twin(*_values(cls, 3))
    object.__setattr__(looped, first, [looped])
    object.__setattr__(twin_looped, first, [twin_looped])
    assert repr(looped) == repr(twin_looped)


def test_endpoints_sort_as_before() -> None:
    endpoints = [model.Endpoint("::1", 80), model.Endpoint("127.0.0.1", 9), model.Endpoint("127.0.0.1", 8)]
    assert sorted(endpoints) == [
        model.Endpoint("127.0.0.1", 8),
        model.Endpoint("127.0.0.1", 9),
        model.Endpoint("::1", 80),
    ]


def test_only_frozen_slotted_classes_without_their_own_methods() -> None:
    with pytest.raises(TypeError):
        _frozen.dataclass(frozen=True)
    with pytest.raises(TypeError):

        @_frozen.dataclass(frozen=True, slots=True)
        class Shown:
            """A class with its own repr."""

            value: int

            def __repr__(self) -> str:
                return "shown"

    with pytest.raises(TypeError):

        @_frozen.dataclass(frozen=True, slots=True)
        class Undocumented:
            value: int

    with pytest.raises(TypeError):

        @_frozen.dataclass(frozen=True, slots=True)
        class Hashed:
            """A field with an option the methods here do not follow."""

            value: int = dataclasses.field(default=0, hash=False)


def test_fields_left_out_of_comparisons_and_repr() -> None:
    """``field(compare=False, repr=False)`` (Netns.fd): equal and hashed without it, not shown."""

    @_frozen.dataclass(frozen=True, slots=True)
    class Named:
        """A name and a handle that does not count."""

        name: str
        handle: int | None = dataclasses.field(default=None, compare=False, repr=False)

    twin = _twin(Named)
    assert Named("a", 1) == Named("a", 2)
    assert hash(Named("a", 1)) == hash(Named("a", 2)) == hash(twin("a", 3))
    assert (
        repr(Named("a", 1))
        == repr(twin("a", 1))
        == "test_fields_left_out_of_comparisons_and_repr.<locals>.Named(name='a')"
    )
    assert Named("a").handle is None


def test_nothing_is_compiled_until_used() -> None:
    """The console's scan builds most records through closewait._records: those classes never run
    dataclasses' code generation; the first call of the constructor does, for that class only."""
    script = """
import sys
from closewait import _records, _frozen, model
def compiled(cls):
    return not isinstance(vars(cls)["__init__"], _frozen._Generated)
e = _records.make_endpoint("::1", 80)
assert repr(e) == "Endpoint(address='::1', port=80)" and e == _records.make_endpoint("::1", 80) and hash(e)
assert not any(compiled(c) for c in (model.Endpoint, model.Socket, model.Snapshot))
model.Diagnosis("code", "summary", "remedy")
assert compiled(model.Diagnosis) and not compiled(model.Endpoint)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "ok", done.stderr


def test_a_class_read_while_its_generated_names_are_being_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generated names are set one by one: another thread that reads the class in between (the
    exporter's scrapes run scans in threads) waits, and then gets the real fields, never a stand-in
    or a recursion. The interleaving is made here: right after ``__init__`` is set, a ``setattr``
    starts a thread that reads the fields, and gives it time to run before the rest is set."""

    @_frozen.dataclass(frozen=True, slots=True)
    class Point:
        """A point."""

        x: int
        y: int = 0

    read: list[object] = []
    readers: list[threading.Thread] = []
    real_setattr = setattr

    def reader() -> None:
        try:
            read.append([f.name for f in dataclasses.fields(Point)])
        except BaseException as err:  # reported by the assertion below
            read.append(err)

    def interleaved(obj: object, name: str, value: object) -> None:
        real_setattr(obj, name, value)
        if obj is Point and name == "__init__" and not readers:
            readers.append(threading.Thread(target=reader))
            readers[0].start()
            readers[0].join(0.2)  # the reader runs now, with the fields not set yet

    monkeypatch.setattr(_frozen, "setattr", interleaved, raising=False)
    assert Point(1) == Point(1, 0)
    readers[0].join(10)
    assert read == [["x", "y"]]
