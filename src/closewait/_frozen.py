"""The model's frozen, slotted dataclasses, with the code ``dataclasses`` generates made only when used.

``@dataclasses.dataclass(frozen=True, slots=True)`` writes each class's ``__init__``, ``__repr__``,
``__eq__``, ``__hash__``, ``__setattr__`` and ``__delattr__`` (and four comparisons for
``order=True``) as source text and compiles it: ~0.5 ms per class, ~6 ms for the model's eleven,
a third of the imports of every ``closewait scan --json``, which calls few of them. ``dataclass``
here makes the same class without compiling anything (``import closewait.model``: 7.3 ms of CPU
with the plain decorator, 1.1 ms with this one; ``bench/bench_model_import.py``):

- ``__eq__``, ``__hash__``, ``__repr__``, the comparisons, the frozen ``__setattr__`` and
  ``__delattr__``, ``__getstate__`` and ``__setstate__`` (pickle, copy) are written once below for
  every class, from its field names; they return what the generated ones return (the same tuple
  comparisons and hash, the same text, the same ``FrozenInstanceError``);
- ``__init__``, ``__dataclass_fields__`` and ``__dataclass_params__`` (what ``dataclasses.fields``,
  ``replace``, ``asdict`` and ``is_dataclass`` read) stand in as ``_Generated`` until first read:
  then ``dataclasses.dataclass`` itself runs on a copy of the class as written (same fields,
  defaults, name, docstring and options) and its ``__init__`` and metadata are taken over (the
  constructor and the fields first, the class's options when they are read: copies made without
  ``eq`` and ``repr``, and with them, so each compiles only what it needs). So
  ``Endpoint("::1", 80)``, ``inspect.signature(Endpoint)`` and ``dataclasses.replace`` behave as
  with the plain decorator; a class only ever built by ``closewait._records``' constructors never
  compiles anything.

The model imports ``dataclass`` from here at run time and from ``dataclasses`` for type checkers, so
mypy checks the classes as the dataclasses they are (``sources/netns.py`` does the same). Only
``frozen=True, slots=True`` (and ``order``) is supported, with a docstring, no method of those above
defined by the class, and ``field()`` given only ``default``, ``default_factory``, ``compare`` or
``repr``; anything else is a TypeError at import. tests/scanperf/test_frozen.py compares each class
made here with the one the plain decorator makes.
"""

from __future__ import annotations

import _thread
import sys
from operator import attrgetter

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: What ``dataclasses`` adds that is taken from it on first use (``__replace__``: Python 3.13's
#: ``copy.replace``): the constructor with the fields, then (rarely read) the class's options.
_FROM_INIT = ("__init__", "__dataclass_fields__") + (("__replace__",) if sys.version_info >= (3, 13) else ())
_FROM_PARAMS = ("__dataclass_params__",)
_GENERATED = _FROM_INIT + _FROM_PARAMS
#: Held while a class's generated names are set (``_make``'s ``take``).
_LOCK = _thread.RLock()


def dataclass(cls: type | None = None, /, *, frozen: bool = False, slots: bool = False, order: bool = False) -> Any:
    """``dataclasses.dataclass(frozen=True, slots=True, order=order)``, compiled on first use."""
    if not (frozen and slots):
        raise TypeError("closewait._frozen.dataclass makes frozen, slotted dataclasses only")

    def wrap(cls: type) -> type:
        return _make(cls, order)

    return wrap if cls is None else wrap(cls)


class _Generated:
    """What ``dataclasses`` generates for one class, made when this attribute is first read."""

    def __init__(self, name: str, generate: Callable[[], type]) -> None:
        self.name = name
        self.generate = generate

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        cls = self.generate()  # replaces this _Generated (and those made with it) on the class
        value = vars(cls)[self.name]
        if isinstance(value, _Generated):  # never expected: say so rather than recurse
            raise RuntimeError(f"{cls.__qualname__}.{self.name} could not be generated")
        getter = getattr(type(value), "__get__", None)
        return getter(value, instance, owner) if getter is not None else value


def _make(written: type, order: bool) -> type:
    body = dict(vars(written))
    own = sorted(name for name in (*_GENERATED, *_METHODS, *_ORDER) if name in body)
    if own or written.__doc__ is None:
        # dataclasses keeps a method the class defines (and writes a docstring with inspect's help):
        # rules this module does not follow, for classes that do not need them.
        raise TypeError(f"{written.__qualname__}: define no {', '.join(own) or 'method it makes'}, write a docstring")
    names = tuple(body.get("__annotations__", {}))
    defaults = {name: body.pop(name) for name in names if name in body}
    compared = tuple(name for name in names if _option(written, name, defaults.get(name), "compare"))
    shown = tuple(name for name in names if _option(written, name, defaults.get(name), "repr"))
    body.pop("__dict__", None)
    body.pop("__weakref__", None)
    body["__slots__"] = names
    body["__match_args__"] = names
    made_class: list[type] = []  # the class, for __setattr__ and __delattr__: made below, after them
    body.update(_methods(written.__qualname__, made_class, names, compared, shown, order))

    def take(names: tuple[str, ...], **options: bool) -> type:
        """Set ``names`` on the class from a copy of it as written, made by ``dataclasses``.

        Under ``_LOCK``: the names are set one by one, and a thread that reads one still standing
        in meanwhile (the exporter's scrapes run scans in threads) waits here for all of them,
        instead of finding ``__init__`` made and taking the others' stand-ins for the real ones."""
        with _LOCK:
            if any(isinstance(vars(cls).get(name), _Generated) for name in names):
                import dataclasses

                copy = dict(vars(written))
                copy.pop("__dict__", None)
                copy.pop("__weakref__", None)
                twin = type(written)(written.__name__, written.__bases__, copy)
                twin.__qualname__ = written.__qualname__
                made = vars(dataclasses.dataclass(frozen=True, slots=True, **options)(twin))
                for name in names:
                    setattr(cls, name, made[name])
        return cls

    def with_init() -> type:
        # __init__ and the fields do not depend on eq, repr or order: without them, dataclasses
        # compiles three functions instead of six (~0.45 instead of ~0.8 ms for Snapshot).
        return take(_FROM_INIT, eq=False, repr=False)

    def with_params() -> type:
        return take(_FROM_PARAMS, order=order)

    body.update({name: _Generated(name, with_init) for name in _FROM_INIT})
    body.update({name: _Generated(name, with_params) for name in _FROM_PARAMS})
    cls: type = type(written)(written.__name__, written.__bases__, body)
    cls.__qualname__ = written.__qualname__
    made_class.append(cls)
    return cls


def _option(written: type, name: str, default: object, option: str) -> bool:
    """Whether field ``name`` takes part in comparisons (``option`` "compare") or the repr ("repr"):
    a ``dataclasses.field(...)`` default may say it does not. Any other option of ``field`` but
    ``default`` and ``default_factory`` is refused: the methods here do not follow it."""
    if type(default).__name__ != "Field" or type(default).__module__ != "dataclasses":
        return True
    field: Any = default
    if not field.init or field.hash is not None or field.metadata or field.kw_only not in (False, _missing()):
        raise TypeError(
            f"{written.__qualname__}.{name}: field() takes only default, default_factory, compare, repr here"
        )
    return bool(getattr(field, option))


def _missing() -> object:
    import dataclasses  # already imported: the class called dataclasses.field

    return dataclasses.MISSING


_METHODS = ("__eq__", "__hash__", "__repr__", "__setattr__", "__delattr__", "__getstate__", "__setstate__")
_ORDER = ("__lt__", "__le__", "__gt__", "__ge__")


def _getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """The values of fields ``names`` of an object, as one tuple."""
    if len(names) > 1:
        return attrgetter(*names)
    return lambda self: tuple([getattr(self, name) for name in names])


def _methods(
    qualname: str,
    made_class: list[type[Any]],
    names: tuple[str, ...],
    compared: tuple[str, ...],
    shown: tuple[str, ...],
    order: bool,
) -> dict[str, Callable[..., Any]]:
    """The methods ``dataclasses`` would generate for a frozen class (``made_class[0]``, once made)
    with fields ``names``, of which ``compared`` take part in equality, hash and order and ``shown``
    in the repr, written once: the values are compared and hashed as one tuple, in field order, as
    its code does."""
    values = _getter(compared)
    shown_values = _getter(shown)
    running: set[tuple[int, int]] = set()

    def __eq__(self: Any, other: object) -> Any:
        if other.__class__ is self.__class__:
            return values(self) == values(other)
        return NotImplemented

    def __hash__(self: Any) -> int:
        return hash(values(self))

    def __repr__(self: Any) -> str:
        key = (id(self), _thread.get_ident())
        if key in running:  # the object is in its own fields: as dataclasses' recursive repr
            return "..."
        running.add(key)
        try:
            text = ", ".join([f"{name}={value!r}" for name, value in zip(shown, shown_values(self), strict=True)])
            return f"{self.__class__.__qualname__}({text})"
        finally:
            running.discard(key)

    def __setattr__(self: Any, name: str, value: object) -> None:
        cls = made_class[0]
        if type(self) is cls or name in names:
            from dataclasses import FrozenInstanceError

            raise FrozenInstanceError(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)

    def __delattr__(self: Any, name: str) -> None:
        cls = made_class[0]
        if type(self) is cls or name in names:
            from dataclasses import FrozenInstanceError

            raise FrozenInstanceError(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)

    def __getstate__(self: Any) -> list[Any]:
        return [getattr(self, name) for name in names]

    def __setstate__(self: Any, state: list[Any]) -> None:
        for name, value in zip(names, state):  # noqa: B905 (as dataclasses: a short state sets fewer)
            object.__setattr__(self, name, value)  # frozen: as dataclasses' own __setstate__

    methods: dict[str, Callable[..., Any]] = {
        "__eq__": __eq__,
        "__hash__": __hash__,
        "__repr__": __repr__,
        "__setattr__": __setattr__,
        "__delattr__": __delattr__,
        "__getstate__": __getstate__,
        "__setstate__": __setstate__,
    }
    if order:

        def __lt__(self: Any, other: object) -> Any:
            if other.__class__ is self.__class__:
                return values(self) < values(other)
            return NotImplemented

        def __le__(self: Any, other: object) -> Any:
            if other.__class__ is self.__class__:
                return values(self) <= values(other)
            return NotImplemented

        def __gt__(self: Any, other: object) -> Any:
            if other.__class__ is self.__class__:
                return values(self) > values(other)
            return NotImplemented

        def __ge__(self: Any, other: object) -> Any:
            if other.__class__ is self.__class__:
                return values(self) >= values(other)
            return NotImplemented

        methods.update(__lt__=__lt__, __le__=__le__, __gt__=__gt__, __ge__=__ge__)
    for name, method in methods.items():
        method.__qualname__ = f"{qualname}.{name}"
    return methods
