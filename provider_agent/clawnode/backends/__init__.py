"""WireGuard backends: the agent's only way to touch WireGuard, one module per backend.

- ``base``: the ``WireGuardBackend`` interface, ``PeerStatus``, what implementations share;
- ``kernel``: the kernel's WireGuard through pyroute2 (``netlink``: its messages, parsed);
- ``userspace``: wireguard-go over its UAPI socket (``uapi``: its text, parsed);
- ``memory``: ``FakeBackend``, in memory, the test double of the daemon's tests;
- ``links``: the interface's address and link through pyroute2, here or in a child process;
- ``choose``: ``--backend auto|kernel|userspace``;
- ``errors``: ``WireGuardError``.

Nothing is imported here: ``python -m clawnode.backends.links`` runs as a short-lived child and
must not load the backends (or PyNaCl) to start.
"""
