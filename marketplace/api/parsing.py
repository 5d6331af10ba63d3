"""What the API accepts from a client before any view runs: JSON bodies of bounded depth, and
pages of bounded size and offset. Hostile input gets a 400 or 413 that names what is wrong,
never a 500 (a RecursionError from a body nested 10,000 deep, or "bigint out of range" from
``?limit=10000000000000000000`` reaching SQL)."""

from __future__ import annotations

import codecs
import json
from typing import Any

from django.conf import settings
from rest_framework import exceptions, pagination, parsers

# No MOLT request body is more than a few levels deep (an order, a listing, an enrolment with
# its GPUs); the wire protocol's own bodies stop at 32 (clawnode.wire.signing).
MAX_JSON_DEPTH = 32
# SQL's OFFSET is a bigint; a page past a billion rows is never a real request.
MAX_OFFSET = 10**9


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) nests deeper than ``limit``. Iterative, so it cannot
    itself run out of stack."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _no_fractions(text: str) -> Any:
    raise ValueError(
        "numbers must be whole: amounts are integers of millionths of a dollar "
        f"(1000000 is $1.00), got {text[:32]}"
    )


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class BoundedJSONParser(parsers.JSONParser):
    """DRF's JSON parser with MOLT's rules: no body nested deeper than MAX_JSON_DEPTH, and no
    fractional numbers at all (``5.0``, ``1e3``): every number the API takes is a whole count
    (micro-USD, hours, GPUs, ids), and a float that DRF's IntegerField would quietly truncate
    must be refused where it enters. Each is a 400 that says which rule."""

    def parse(self, stream, media_type=None, parser_context=None):  # type: ignore[no-untyped-def]
        encoding = (parser_context or {}).get("encoding") or settings.DEFAULT_CHARSET
        try:
            data = json.load(
                codecs.getreader(encoding)(stream),
                parse_float=_no_fractions,
                parse_constant=_no_constants,
            )
        except RecursionError:
            # CPython's decoder gives up on deep nesting with RecursionError before returning.
            raise exceptions.ParseError(_too_deep()) from None
        except ValueError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
        if json_depth_exceeds(data, MAX_JSON_DEPTH):
            raise exceptions.ParseError(_too_deep())
        return data


def _too_deep() -> str:
    return f"JSON body is nested deeper than {MAX_JSON_DEPTH} levels"


def loads_bounded(text: str | bytes) -> Any:
    """json.loads with the same depth rule, for the places that parse JSON themselves.
    Raises ValueError naming the problem."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError(_too_deep()) from None
    if json_depth_exceeds(data, MAX_JSON_DEPTH):
        raise ValueError(_too_deep())
    return data


class BoundedLimitOffsetPagination(pagination.LimitOffsetPagination):
    """limit/offset paging with a ceiling on both: ``limit`` is capped at max_limit (as DRF
    does), and an ``offset`` that is not a number from 0 to MAX_OFFSET is a 400 naming it,
    instead of an SQL error."""

    max_limit = 200

    def get_offset(self, request):  # type: ignore[no-untyped-def]
        raw = request.query_params.get(self.offset_query_param)
        if raw is None:
            return 0
        # Length first: int() of a string of thousands of digits is itself an error.
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) > MAX_OFFSET:
            raise exceptions.ValidationError(
                {self.offset_query_param: [f"must be a whole number from 0 to {MAX_OFFSET}"]}
            )
        return int(raw)

    def get_limit(self, request):  # type: ignore[no-untyped-def]
        raw = request.query_params.get(self.limit_query_param)
        if raw is None:
            return self.default_limit
        if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
            raise exceptions.ValidationError(
                {self.limit_query_param: [f"must be a whole number from 1 to {self.max_limit}"]}
            )
        # Huge values are capped, not refused (DRF's documented behaviour for max_limit); a
        # string of thousands of digits is not even turned into a number.
        return self.max_limit if len(raw) > 6 else min(int(raw), self.max_limit)

    def get_schema_operation_parameters(self, view):  # type: ignore[no-untyped-def]
        # The bounds the methods above enforce, stated in the schema (Schemathesis checks both
        # ways). `limit` has no maximum: a larger one is capped, not refused.
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.limit_query_param:
                parameter["schema"]["minimum"] = 1
            elif parameter["name"] == self.offset_query_param:
                parameter["schema"].update(minimum=0, maximum=MAX_OFFSET)
        return parameters


def max_body_bytes() -> int:
    return int(settings.DATA_UPLOAD_MAX_MEMORY_SIZE or 0)
