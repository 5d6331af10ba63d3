"""The API's one error shape: service errors carry their status, message, code and field; DRF's
validation errors keep DRF's shape; an unexpected exception is a generic 500 that shows
neither the traceback nor the message."""

from __future__ import annotations

import logging

import pytest
from rest_framework import exceptions

from marketplace.api.errors import exception_handler
from marketplace.errors import InsufficientFunds, MarketError, Oversold
from meshnet.errors import EnrollmentRefused, PoolExhausted

pytestmark = [pytest.mark.db, pytest.mark.django_db]


def test_a_market_error_naming_a_field_is_shown_beside_that_field():
    response = exception_handler(MarketError("unknown listing 9", field="listing"), {})

    assert response.status_code == 400
    assert response.data == {
        "detail": "unknown listing 9",
        "code": "invalid",
        "listing": ["unknown listing 9"],
    }


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InsufficientFunds("insufficient funds"), 402, "insufficient_funds"),
        (Oversold("only 1 of 4 GPUs are free"), 409, "oversold"),
        (PoolExhausted("molt"), 409, "pool_exhausted"),
        (EnrollmentRefused("enrolment token has expired"), 403, "enrollment_refused"),
    ],
)
def test_service_errors_keep_their_status_and_code(error, status, code):
    response = exception_handler(error, {})

    assert response.status_code == status
    assert response.data["code"] == code
    assert response.data["detail"] == str(error)


def test_drf_validation_errors_keep_drfs_shape():
    response = exception_handler(exceptions.ValidationError({"hours": ["must be positive"]}), {})

    assert response.status_code == 400
    assert response.data == {"hours": ["must be positive"]}


def test_other_drf_errors_get_a_code_beside_the_detail():
    response = exception_handler(exceptions.NotFound(), {})

    assert response.status_code == 404
    assert response.data["code"] == "not_found"


def test_an_unexpected_error_is_a_generic_500_and_is_logged(caplog):
    with caplog.at_level(logging.ERROR, logger="marketplace.api.errors"):
        response = exception_handler(RuntimeError("password=hunter2 at line 7"), {})

    assert response.status_code == 500
    assert response.data == {"detail": "internal error; it has been logged", "code": "server_error"}
    assert "hunter2" not in str(response.data)
    assert any(record.exc_info for record in caplog.records)
