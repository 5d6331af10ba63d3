"""Job sandboxes on the provider node: one container per order with exactly its GPUs, its own
network namespace and address, and sshd with the buyer's keys (docs/provider.md).

- ``engine``: the container engine interface (Podman by default, Docker behind the same one).
"""
