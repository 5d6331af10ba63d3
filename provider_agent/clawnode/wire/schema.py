"""The one serialisation of the wire types: ``Message``, a base for frozen dataclasses whose
fields name their checks, from which it derives validation, ``from_dict`` and ``to_dict``.

A field names its checks in its annotation::

    @dataclass(frozen=True)
    class PeerCounters(Message):
        public_key: Annotated[str, fields.wireguard_key]
        epoch: Annotated[int, fields.integer()]

Every check of every field runs in the constructor (declaration order, a field's checks in the
order written, each given what the one before returned), so an instance is valid whether
``from_dict`` parsed it or gateway code built it. A list field of other messages names
``items(Type, max_len)``: ``from_dict`` parses its elements with ``Type.from_dict`` and an error
inside one is reported at its place (``gpus[1].memory_mb``). List fields are kept as tuples
(hashable, immutable); ``to_dict`` gives lists, ready for json.dumps and canonical_bytes.
Signatures are always checked over the received body dict, never over to_dict() of the parsed
object.

Pure: stdlib, no Django.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from .fields import Check, ProtocolError, sequence, short

__all__ = ["Message", "items"]


@dataclass(frozen=True)
class _Items:
    """The check of a list of ``cls`` messages; also tells from_dict how to parse the list."""

    cls: type[Message]
    max_len: int

    def __call__(self, value: object, name: str) -> tuple[Any, ...]:
        values = sequence(value, name, self.max_len)
        for i, item in enumerate(values):
            if not isinstance(item, self.cls):
                raise ProtocolError(f"{name}[{i}] must be a {self.cls.__name__}", f"{name}[{i}]")
        return values

    def parse(self, value: object, name: str) -> tuple[Any, ...]:
        """Each element through ``cls.from_dict`` (instances pass through)."""
        out = []
        for i, item in enumerate(sequence(value, name, self.max_len)):
            try:
                out.append(item if isinstance(item, self.cls) else self.cls.from_dict(item))
            except ProtocolError as exc:
                raise _nested(exc, f"{name}[{i}]") from None
        return tuple(out)


def items(cls: type[Message], max_len: int) -> Check:
    """A list of at most ``max_len`` ``cls`` messages (dicts when parsed)."""
    return _Items(cls, max_len)


def _nested(exc: ProtocolError, prefix: str) -> ProtocolError:
    """A nested object's error with its place in the parent (``gpus[1].name``)."""
    if exc.field:
        return ProtocolError(f"{prefix}.{exc}", f"{prefix}.{exc.field}")
    return ProtocolError(f"{prefix}: {exc}", prefix)


@dataclass(frozen=True)
class _Layout:
    """What Message needs to know of one message type, worked out once per type: a desired
    state parses a thousand PeerSpecs."""

    names: tuple[str, ...]  # every field, in declaration order
    known: frozenset[str]
    required: tuple[str, ...]  # the fields without a default, in declaration order
    checks: tuple[tuple[str, tuple[Check, ...]], ...]
    lists: tuple[tuple[str, _Items], ...]  # the list-of-messages fields


_LAYOUTS: dict[type[Any], _Layout] = {}


def _layout(cls: type[Any]) -> _Layout:
    layout = _LAYOUTS.get(cls)
    if layout is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = dataclasses.fields(cls)
        checks = []
        for f in fields:
            named = tuple(getattr(hints[f.name], "__metadata__", ()))
            if not named or not all(callable(check) for check in named):
                raise TypeError(f"{cls.__name__}.{f.name} must be Annotated with its checks")
            checks.append((f.name, named))
        layout = _Layout(
            names=tuple(f.name for f in fields),
            known=frozenset(f.name for f in fields),
            required=tuple(
                f.name
                for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ),
            checks=tuple(checks),
            lists=tuple(
                (name, check) for name, named in checks for check in named if type(check) is _Items
            ),
        )
        _LAYOUTS[cls] = layout
    return layout


class Message:
    """Base of the wire types (frozen dataclasses whose fields are Annotated with checks)."""

    if typing.TYPE_CHECKING:

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    def __post_init__(self) -> None:
        for name, checks in _layout(type(self)).checks:
            given = value = getattr(self, name)
            for check in checks:
                value = check(value, name)
            if value is not given:  # a list kept as a tuple
                object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Parse and check ``data``: an object with exactly this type's fields (those with a
        default may be left out). Raises ProtocolError naming the field."""
        layout = _layout(cls)
        fields = checked_fields(cls, data, layout)
        for name, of in layout.lists:
            if name in fields:
                fields[name] = of.parse(fields[name], name)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in _layout(type(self)).names:
            value = getattr(self, name)
            if type(value) is tuple:
                value = [item.to_dict() if isinstance(item, Message) else item for item in value]
            elif isinstance(value, Message):
                value = value.to_dict()
            out[name] = value
        return out


def checked_fields(cls: type[Any], data: object, layout: _Layout) -> dict[str, Any]:
    """Check ``data`` is an object with exactly the dataclass's fields (defaults optional)."""
    if not isinstance(data, Mapping):
        raise ProtocolError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    # The kind string carries the version, so a new field means a new version: an unknown field
    # is a bug or a forgery, not something to drop silently.
    if not layout.known.issuperset(data):
        for key in data:
            if key not in layout.known:
                raise ProtocolError(f"{short(key)} is not a field of {cls.__name__}", str(key)[:64])
    for name in layout.required:
        if name not in data:
            raise ProtocolError(f"{name} is required", name)
    return dict(data)
