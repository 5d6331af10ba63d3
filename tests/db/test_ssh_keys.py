"""A buyer's SSH public keys (marketplace.ssh_keys, /api/v1/ssh-keys/, /accounts/ssh-keys/).

The oracle is OpenSSH itself: keys are made by the real `ssh-keygen -t ...`, and a key is taken
exactly when `ssh-keygen -lf` reads it, with the fingerprint it prints. What ssh-keygen would
take but MOLT refuses on purpose (options or a forced command, several keys, a private key) is
tested by the message that says what to paste instead."""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess

import pytest
from django.test import Client

from marketplace.errors import MarketError
from marketplace.models import SshKey
from marketplace.ssh_keys import add_ssh_key, parse_public_key
from tests.factories import ssh_public_key

pytestmark = [pytest.mark.db, pytest.mark.django_db]

SSH_KEYGEN = shutil.which("ssh-keygen")


@pytest.fixture(scope="module")
def keygen():
    assert SSH_KEYGEN, "ssh-keygen is missing: install openssh-client (the test's oracle)"
    return SSH_KEYGEN


def make_key(keygen, tmp_path, kind: str, bits: int | None = None) -> tuple[str, str]:
    """A key pair made by ssh-keygen: (the .pub line, the private key file's text)."""
    path = tmp_path / f"id_{kind}_{bits or 'default'}"
    command = [keygen, "-q", "-t", kind, "-N", "", "-C", f"alice@{kind}", "-f", str(path)]
    if bits:
        command[4:4] = ["-b", str(bits)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return path.with_suffix(".pub").read_text(), path.read_text()


def keygen_reads(keygen, tmp_path, line: str) -> str | None:
    """The fingerprint `ssh-keygen -lf` prints for `line`, or None when it refuses it."""
    path = tmp_path / "candidate.pub"
    path.write_text(line)
    result = subprocess.run([keygen, "-lf", str(path)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return None
    return result.stdout.split()[1]


def ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def sk_ed25519_line() -> str:
    """A FIDO (sk-) ed25519 public key: made by hand, as no security key is plugged in here."""
    blob = (
        ssh_string(b"sk-ssh-ed25519@openssh.com")
        + ssh_string(bytes(range(32)))
        + ssh_string(b"ssh:")
    )
    return f"sk-ssh-ed25519@openssh.com {base64.b64encode(blob).decode()} alice@yubikey"


@pytest.mark.parametrize(
    ("kind", "bits"),
    [
        ("ed25519", None),
        ("rsa", 2048),
        ("rsa", 3072),
        ("ecdsa", 256),
        ("ecdsa", 384),
        ("ecdsa", 521),
    ],
)
def test_keys_made_by_ssh_keygen_are_taken_with_its_fingerprint(keygen, tmp_path, kind, bits):
    public, _private = make_key(keygen, tmp_path, kind, bits)

    key = parse_public_key(public)

    assert key.fingerprint == keygen_reads(keygen, tmp_path, public)
    assert key.fingerprint.startswith("SHA256:") and not key.fingerprint.endswith("=")
    assert key.line == public.strip()
    assert keygen_reads(keygen, tmp_path, key.line) == key.fingerprint


def test_a_security_key_public_key_is_taken_as_ssh_keygen_reads_it(keygen, tmp_path):
    line = sk_ed25519_line()
    assert keygen_reads(keygen, tmp_path, line) == parse_public_key(line).fingerprint


def _retyped(line: str, new_type: str) -> str:
    parts = line.split()
    return " ".join([new_type, *parts[1:]])


def _truncated(line: str) -> str:
    kind, encoded = line.split()[:2]
    blob = base64.b64decode(encoded)[:-7]
    return f"{kind} {base64.b64encode(blob).decode()}"


def _corrupted_point(line: str) -> str:
    """An ecdsa key whose point is not on the curve."""
    kind, encoded = line.split()[:2]
    blob = bytearray(base64.b64decode(encoded))
    blob[-1] ^= 0x01
    return f"{kind} {base64.b64encode(bytes(blob)).decode()}"


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda ed, ec: "", id="empty"),
        pytest.param(lambda ed, ec: "hello world", id="not a key"),
        pytest.param(lambda ed, ec: "ssh-ed25519", id="no base64"),
        pytest.param(lambda ed, ec: "ssh-ed25519 not*base64!", id="bad base64"),
        pytest.param(lambda ed, ec: _retyped(ed, "ssh-rsa"), id="blob of another type"),
        pytest.param(lambda ed, ec: _truncated(ed), id="truncated blob"),
        pytest.param(lambda ed, ec: _corrupted_point(ec), id="ecdsa point off the curve"),
        pytest.param(lambda ed, ec: _retyped(ed, "ssh-foo"), id="unknown type"),
    ],
)
def test_what_ssh_keygen_refuses_is_refused_naming_public_key(keygen, tmp_path, spoil):
    ed, _ = make_key(keygen, tmp_path, "ed25519")
    ec, _ = make_key(keygen, tmp_path, "ecdsa", 256)
    line = spoil(ed.strip(), ec.strip())
    assert keygen_reads(keygen, tmp_path, line) is None  # the oracle refuses it too

    with pytest.raises(MarketError) as refused:
        parse_public_key(line)

    assert refused.value.field == "public_key"


def test_a_small_rsa_key_is_refused_as_openssh_refuses_it(keygen, tmp_path):
    # ssh-keygen itself will not make one; this is a 768-bit modulus built by hand.
    n = (1 << 767) | 1
    modulus = b"\x00" + n.to_bytes(96, "big")  # an mpint: a leading zero keeps it positive
    blob = ssh_string(b"ssh-rsa") + ssh_string(b"\x01\x00\x01") + ssh_string(modulus)
    line = f"ssh-rsa {base64.b64encode(blob).decode()}"
    assert keygen_reads(keygen, tmp_path, line) is None

    with pytest.raises(MarketError, match="at least 1024 bits"):
        parse_public_key(line)


def test_a_private_key_pasted_by_mistake_says_to_paste_the_pub_file(keygen, tmp_path):
    _public, private = make_key(keygen, tmp_path, "ed25519")

    with pytest.raises(MarketError) as refused:
        parse_public_key(private)

    assert refused.value.field == "public_key"
    assert "this is a private key: paste the .pub file" in str(refused.value)


@pytest.mark.parametrize(
    "options",
    [
        'command="/bin/true" ',
        'from="10.0.0.0/8",no-pty ',
        "no-port-forwarding,no-agent-forwarding ",
    ],
)
def test_options_and_forced_commands_are_refused(keygen, tmp_path, options):
    public, _ = make_key(keygen, tmp_path, "ed25519")
    line = options + public.strip()
    # authorized_keys would run that command on every login: refused, though ssh-keygen reads it.
    assert keygen_reads(keygen, tmp_path, line) is not None

    with pytest.raises(MarketError, match="options such as command=") as refused:
        parse_public_key(line)
    assert refused.value.field == "public_key"


def test_several_keys_in_one_field_are_refused(keygen, tmp_path):
    first, _ = make_key(keygen, tmp_path, "ed25519")
    second, _ = make_key(keygen, tmp_path, "ecdsa", 256)

    for pasted in (first + second, first.strip() + " " + second.strip()):
        with pytest.raises(MarketError, match="one key per field") as refused:
            parse_public_key(pasted)
        assert refused.value.field == "public_key"


def test_options_alone_or_a_key_type_in_a_comment_are_told_apart():
    with pytest.raises(MarketError, match="options such as command="):
        parse_public_key('command="/bin/sh" AAAAC3NzaC1lZDI1NTE5')
    with pytest.raises(MarketError, match="options such as command="):
        parse_public_key("restrict,pty")

    line = ssh_public_key("replaces my old ssh-rsa key")
    assert parse_public_key(line).comment == "replaces my old ssh-rsa key"


def test_a_key_wrapped_over_lines_is_refused():
    line = ssh_public_key()
    kind, encoded = line.split()
    with pytest.raises(MarketError, match="one line"):
        parse_public_key(f"{kind} {encoded[:30]}\n{encoded[30:]}")


def test_a_dsa_key_is_refused_with_why():
    with pytest.raises(MarketError, match="DSA"):
        parse_public_key("ssh-dss AAAAB3NzaC1kc3MAAACBAP8=")


# --- the account's keys -----------------------------------------------------------------------


def test_an_account_holds_twenty_keys_and_refuses_the_21st(buyer):
    for i in range(SshKey.MAX_PER_USER):
        add_ssh_key(buyer, public_key=ssh_public_key(f"key{i}"))

    with pytest.raises(MarketError, match="at most 20 keys") as refused:
        add_ssh_key(buyer, public_key=ssh_public_key("one too many"))

    assert refused.value.field == "public_key"
    assert SshKey.objects.filter(user=buyer).count() == 20


def test_the_same_key_twice_on_one_account_is_refused_but_two_accounts_may_share_it(
    buyer, stranger
):
    line = ssh_public_key("shared")
    add_ssh_key(buyer, public_key=line, name="laptop")

    with pytest.raises(MarketError, match="already on your account, as 'laptop'"):
        add_ssh_key(buyer, public_key=line + "\n", name="again")

    assert add_ssh_key(stranger, public_key=line).user == stranger


def test_the_name_defaults_to_the_comment_and_a_long_name_is_refused_naming_name(buyer):
    key = add_ssh_key(buyer, public_key=ssh_public_key("alice@laptop"))
    assert key.name == "alice@laptop"
    assert add_ssh_key(buyer, public_key=ssh_public_key()).name == "ssh-ed25519"

    with pytest.raises(MarketError) as refused:
        add_ssh_key(buyer, public_key=ssh_public_key(), name="x" * 101)
    assert refused.value.field == "name"


# --- the API ----------------------------------------------------------------------------------


def test_the_api_adds_lists_and_deletes_keys(api_client_for, buyer, keygen, tmp_path):
    api = api_client_for(buyer)
    public, _ = make_key(keygen, tmp_path, "ed25519")

    created = api.post("/api/v1/ssh-keys/", {"name": "laptop", "public_key": public}, format="json")

    assert created.status_code == 201, created.json()
    body = created.json()
    assert set(body) == {"id", "name", "public_key", "fingerprint", "created_at"}
    assert body["fingerprint"] == keygen_reads(keygen, tmp_path, public)
    assert body["public_key"] == public.strip() and body["name"] == "laptop"
    listed = api.get("/api/v1/ssh-keys/").json()
    assert [key["id"] for key in listed["results"]] == [body["id"]]

    assert api.delete(f"/api/v1/ssh-keys/{body['id']}/").status_code == 204
    assert api.get("/api/v1/ssh-keys/").json()["results"] == []


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"public_key": "ssh-ed25519 AAAA"}, "public_key"),
        ({"public_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n"}, "public_key"),
        ({"public_key": 'command="rm -rf /" ' + ssh_public_key()}, "public_key"),
        ({"public_key": ssh_public_key() + "\n" + ssh_public_key()}, "public_key"),
        ({"name": "x" * 101, "public_key": ssh_public_key()}, "name"),
        ({"name": "no key"}, "public_key"),
    ],
)
def test_the_api_answers_a_bad_key_with_400_naming_the_field(api_client_for, buyer, payload, field):
    response = api_client_for(buyer).post("/api/v1/ssh-keys/", payload, format="json")

    assert response.status_code == 400
    assert field in response.json(), response.json()
    assert SshKey.objects.count() == 0


def test_the_api_refuses_the_21st_key_and_a_duplicate(api_client_for, buyer):
    api = api_client_for(buyer)
    line = ssh_public_key()
    assert api.post("/api/v1/ssh-keys/", {"public_key": line}, format="json").status_code == 201
    duplicate = api.post("/api/v1/ssh-keys/", {"public_key": line}, format="json")
    assert duplicate.status_code == 400 and "public_key" in duplicate.json()
    for _ in range(SshKey.MAX_PER_USER - 1):
        add_ssh_key(buyer, public_key=ssh_public_key())

    over = api.post("/api/v1/ssh-keys/", {"public_key": ssh_public_key()}, format="json")

    assert over.status_code == 400
    assert over.json()["code"] == "invalid" and "at most 20 keys" in over.json()["public_key"][0]


def test_another_users_keys_are_invisible_and_cannot_be_deleted(api_client_for, buyer, stranger):
    theirs = add_ssh_key(stranger, public_key=ssh_public_key())
    api = api_client_for(buyer)

    assert api.get("/api/v1/ssh-keys/").json()["results"] == []
    assert api.delete(f"/api/v1/ssh-keys/{theirs.pk}/").status_code == 404
    assert SshKey.objects.filter(pk=theirs.pk).exists()


def test_the_api_needs_a_login(client):
    assert client.get("/api/v1/ssh-keys/").status_code in (401, 403)


# --- the page ---------------------------------------------------------------------------------


def test_the_page_adds_lists_and_deletes_keys(buyer):
    browser = Client()
    browser.force_login(buyer)
    line = ssh_public_key("alice@laptop")

    empty = browser.get("/accounts/ssh-keys/").content.decode()
    assert 'id="no-ssh-keys"' in empty and 'id="nav-ssh-keys"' in empty

    added = browser.post("/accounts/ssh-keys/", {"name": "", "public_key": line}, follow=True)
    page = added.content.decode()
    key = SshKey.objects.get(user=buyer)
    assert key.fingerprint in page and "alice@laptop" in page

    refused = browser.post("/accounts/ssh-keys/", {"name": "", "public_key": "ssh-rsa nope"})
    assert refused.status_code == 200
    assert 'id="id_public_key_error"' in refused.content.decode()

    browser.post(f"/accounts/ssh-keys/{key.pk}/delete/")
    assert not SshKey.objects.filter(user=buyer).exists()


def test_the_page_cannot_delete_someone_elses_key(buyer, stranger):
    theirs = add_ssh_key(stranger, public_key=ssh_public_key())
    browser = Client()
    browser.force_login(buyer)

    assert browser.post(f"/accounts/ssh-keys/{theirs.pk}/delete/").status_code == 404
    assert SshKey.objects.filter(pk=theirs.pk).exists()


def test_the_page_needs_a_login():
    response = Client().get("/accounts/ssh-keys/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
