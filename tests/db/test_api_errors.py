"""The API's one error shape: service errors carry their status, message, code and field; DRF's
validation errors keep DRF's shape; an unexpected exception is a generic 500 that shows
neither the traceback nor the message."""

from __future__ import annotations

import logging

import pytest
from django.db import InterfaceError, OperationalError
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


def test_drf_validation_errors_get_the_one_shape_with_drfs_fields_beside_it():
    error = exceptions.ValidationError(
        {"hours": ["must be positive"], "gpu_count": ["required", "too many"]}, code="max_value"
    )
    response = exception_handler(error, {})

    assert response.status_code == 400
    assert response.data == {
        "detail": "hours: must be positive; gpu count: required too many",
        "code": "max_value",
        "hours": ["must be positive"],
        "gpu_count": ["required", "too many"],
    }
    bare = exception_handler(exceptions.ValidationError(["no such pair"]), {})
    assert bare.data == {
        "detail": "no such pair",
        "code": "invalid",
        "non_field_errors": ["no such pair"],
    }


def test_other_drf_errors_get_a_code_beside_the_detail():
    response = exception_handler(exceptions.NotFound(), {})

    assert response.status_code == 404
    assert response.data["code"] == "not_found"


@pytest.mark.parametrize(
    "error",
    [
        OperationalError("terminating connection due to administrator command"),
        InterfaceError("connection already closed"),
    ],
)
def test_a_lost_database_connection_is_a_503_to_retry_not_a_500(error, caplog):
    with caplog.at_level(logging.WARNING, logger="marketplace.api.errors"):
        response = exception_handler(error, {})

    assert response.status_code == 503
    assert response.data["code"] == "unavailable"
    assert response["Retry-After"] == "1"
    assert "database unavailable" in caplog.text


def test_an_unexpected_error_is_a_generic_500_and_is_logged(caplog):
    with caplog.at_level(logging.ERROR, logger="marketplace.api.errors"):
        response = exception_handler(RuntimeError("password=hunter2 at line 7"), {})

    assert response.status_code == 500
    assert response.data == {"detail": "internal error; it has been logged", "code": "server_error"}
    assert "hunter2" not in str(response.data)
    assert any(record.exc_info for record in caplog.records)


def test_an_api_path_no_route_matches_is_a_json_404_in_the_error_shape(client):
    # Schemathesis' negative ids (an id with a dot) got Django's HTML page here.
    response = client.get("/api/v1/listings/1.5/")

    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "not found", "code": "not_found"}


def test_a_page_no_route_matches_is_still_the_sites_404_page(client):
    response = client.get("/no-such-page/")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")
