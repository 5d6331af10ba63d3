"""Job sandboxes on the provider node: one container per order with exactly its GPUs, its own
network namespace and address, and sshd with the buyer's keys (docs/provider.md).

- ``engine``: the container engine interface (Podman by default, Docker behind the same one).
- ``podman``: the Podman engine (its CLI); ``memory``: the in-memory engine for unit tests.
- ``cdi``: the CDI spec and device names that hand a job exactly its GPUs.
- ``sshd``: the per-job sshd configuration, host key and authorized_keys.
- ``manager``: SandboxManager, what the daemon drives (engine.Sandboxes).
- ``disabled``: NoSandboxes, for an agent without an engine (each sandbox asked for fails).
"""
