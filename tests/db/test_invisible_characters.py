"""Free text users enter and others read refuses invisible format characters (issue 15): a
right-to-left override (U+202E) or an isolate (U+2066-U+2069) can make a name on a page read
as something else. Refused with 400 naming the field; the zero-width joiners some scripts need
are kept."""

from __future__ import annotations

import pytest
from clawnode import wire
from clawnode.keys import Identity

from marketplace import payments
from marketplace.errors import MarketError
from marketplace.models import ApiToken, Order, SshKey
from meshnet.enrolment import create_enrollment_token
from tests.factories import enroll_request, gpu, ssh_public_key

pytestmark = [pytest.mark.db, pytest.mark.django_db]

DISGUISES = ["\u202e", "\u202a", "\u2066", "\u2069", "\u200e", "\u200b", "\ufeff", "\u2060"]


@pytest.mark.parametrize("char", DISGUISES)
def test_an_ssh_key_name_with_a_format_character_is_refused_naming_the_field(
    api_client_for, buyer, char
):
    payload = {"name": f"laptop{char}gpj.exe", "public_key": ssh_public_key()}
    response = api_client_for(buyer).post("/api/v1/ssh-keys/", payload, format="json")

    assert response.status_code == 400
    assert "name" in response.json(), response.json()
    assert f"U+{ord(char):04X}" in str(response.json())
    assert SshKey.objects.count() == 0


def test_a_name_in_a_script_that_needs_the_zero_width_joiners_is_kept(api_client_for, buyer):
    name = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # Persian, with a ZWNJ
    payload = {"name": name, "public_key": ssh_public_key()}
    response = api_client_for(buyer).post("/api/v1/ssh-keys/", payload, format="json")

    assert response.status_code == 201, response.json()
    assert SshKey.objects.get().name == name


def test_a_dispute_reason_with_a_bidi_override_is_refused_naming_the_field(buyer):
    with pytest.raises(MarketError) as refused:
        payments.open_dispute(Order(), buyer, "not what \u202eI paid for")
    assert refused.value.field == "reason"


def test_an_api_token_name_with_a_bidi_isolate_is_refused_by_the_page(client, buyer):
    client.force_login(buyer)
    response = client.post("/accounts/tokens/", {"name": "ci\u2067 admin"})

    assert response.status_code == 200
    assert "invisible format character (U+2067)" in response.content.decode()
    assert not ApiToken.objects.filter(user=buyer).exists()


def test_a_node_enrolling_with_a_disguised_gpu_name_is_refused_naming_the_field(client, provider):
    issued = create_enrollment_token(provider)
    identity = Identity.generate()
    body = enroll_request(identity, issued.token, gpus=[gpu(0)])["body"]
    # As a modified agent would send it: the real one refuses to build it.
    body["gpus"][0]["name"] = "RTX\u202e09"
    envelope = wire.signed_envelope(wire.ENROLL, body, identity)

    response = client.post("/api/v1/nodes/enroll/", envelope, content_type="application/json")

    assert response.status_code == 400
    assert "gpus[0].name" in response.json()["detail"]
    assert "U+202E" in response.json()["detail"]


def test_the_protocol_text_fields_refuse_them_too():
    with pytest.raises(wire.ProtocolError, match=r"U\+2066"):
        wire.GpuInfo(index=0, name="RTX\u2066 4090", memory_mb=1, uuid="GPU-1")
