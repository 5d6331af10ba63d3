"""Per-job sshd material: a host key made fresh for the job, its sshd_config and the buyer's
authorized_keys, in a 0700 directory the container mounts read-only at /etc/molt.

The host key is Ed25519, generated with PyNaCl (already the agent's dependency) and written in
OpenSSH's own private-key format, so no ssh-keygen is needed on the host. Its public line goes
into the sandbox report: the buyer's known_hosts comes from it and the first connect is verified.
"""

from __future__ import annotations

import base64
import os
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nacl.signing

__all__ = ["CONTAINER_DIR", "SshMaterial", "openssh_ed25519", "write_material"]

CONTAINER_DIR = "/etc/molt"
KEY_NAME = "ssh_host_ed25519_key"
_KEY_TYPE = b"ssh-ed25519"


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def openssh_ed25519(seed: bytes, comment: str) -> tuple[str, str]:
    """(private key file text, public key line) of the Ed25519 key with ``seed`` in OpenSSH's
    format (PROTOCOL.key: "openssh-key-v1", no cipher, no KDF, one key)."""
    signing = nacl.signing.SigningKey(seed)
    public = bytes(signing.verify_key)
    public_blob = _string(_KEY_TYPE) + _string(public)
    check = secrets.token_bytes(4)
    private = (
        check
        + check
        + _string(_KEY_TYPE)
        + _string(public)
        + _string(seed + public)
        + _string(comment.encode())
    )
    private += bytes(range(1, 8 - len(private) % 8 + 1)) if len(private) % 8 else b""
    blob = (
        b"openssh-key-v1\0"
        + _string(b"none")
        + _string(b"none")
        + _string(b"")
        + struct.pack(">I", 1)
        + _string(public_blob)
        + _string(private)
    )
    text = base64.b64encode(blob).decode()
    lines = [text[i : i + 70] for i in range(0, len(text), 70)]
    private_text = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\n"
        + "\n".join(lines)
        + "\n-----END OPENSSH PRIVATE KEY-----\n"
    )
    public_line = f"ssh-ed25519 {base64.b64encode(public_blob).decode()} {comment}".rstrip()
    return private_text, public_line


@dataclass(frozen=True)
class SshMaterial:
    mounts: dict[str, str]  # host path -> container path, read-only
    command: tuple[str, ...]
    host_keys: tuple[str, ...]  # "ssh-ed25519 AAAA... molt-order-42"


def _config(env: Mapping[str, str]) -> str:
    lines = [
        "# Written by clawnode for this job only; mounted read-only.",
        "Port 22",
        f"HostKey {CONTAINER_DIR}/{KEY_NAME}",
        f"AuthorizedKeysFile {CONTAINER_DIR}/authorized_keys",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitEmptyPasswords no",
        "UsePAM no",
        "X11Forwarding no",
        "PrintMotd no",
        # Buyers reach web UIs in the sandbox (Jupyter) through ssh -L as well as directly.
        "AllowTcpForwarding yes",
        "Subsystem sftp internal-sftp",
    ]
    # sshd starts sessions with a clean environment; the container's GPU variables must reach
    # the buyer's shell too.
    for key, value in sorted(env.items()):
        lines.append(f'SetEnv {key}="{value}"')
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, mode)


def write_material(
    job_dir: Path, name: str, keys: Sequence[str], env: Mapping[str, str] | None = None
) -> SshMaterial:
    """Write a fresh host key, sshd_config and authorized_keys under ``job_dir``/ssh (0700).

    A second call makes a new host key: a job's key is never reused by another job."""
    ssh_dir = Path(job_dir) / "ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(job_dir, 0o700)
    os.chmod(ssh_dir, 0o700)
    private, public = openssh_ed25519(secrets.token_bytes(32), name)
    _write(ssh_dir / KEY_NAME, private, 0o600)
    _write(ssh_dir / f"{KEY_NAME}.pub", public + "\n", 0o644)
    _write(ssh_dir / "authorized_keys", "".join(f"{key}\n" for key in keys), 0o600)
    _write(ssh_dir / "sshd_config", _config(env or {}), 0o600)
    command = (
        "/bin/sh",
        "-c",
        f"mkdir -p /run/sshd && chmod 0755 /run/sshd && "
        f"exec /usr/sbin/sshd -D -e -f {CONTAINER_DIR}/sshd_config",
    )
    return SshMaterial({str(ssh_dir): CONTAINER_DIR}, command, (public,))


def read_host_keys(job_dir: Path) -> tuple[str, ...]:
    """The host public key written for the job (after an agent restart), or () if none."""
    try:
        text = (Path(job_dir) / "ssh" / f"{KEY_NAME}.pub").read_text()
    except OSError:
        return ()
    return tuple(line.strip() for line in text.splitlines() if line.strip())
