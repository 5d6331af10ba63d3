"""marketplace.idempotency.once: a form's work done at most once per key, and a failed attempt
leaves the key free for a retry."""

from __future__ import annotations

import pytest

from marketplace import idempotency, ledger
from marketplace.models import IdempotencyRecord

pytestmark = [pytest.mark.db, pytest.mark.django_db]


def test_a_repeat_moves_nothing_and_a_failed_attempt_frees_the_key(buyer):
    with pytest.raises(RuntimeError), idempotency.once(buyer, "page:x:1", what="grant 5"):
        ledger.grant_credits(buyer, 5)
        raise RuntimeError("the work failed")
    assert ledger.available_for(buyer) == 0
    assert not IdempotencyRecord.objects.filter(key="page:x:1").exists()

    with idempotency.once(buyer, "page:x:1", what="grant 5"):
        ledger.grant_credits(buyer, 5)
    with pytest.raises(idempotency.AlreadyDone), idempotency.once(buyer, "page:x:1", what="g"):
        ledger.grant_credits(buyer, 5)

    assert ledger.available_for(buyer) == 5
    assert IdempotencyRecord.objects.get(key="page:x:1").response_body == "grant 5"
