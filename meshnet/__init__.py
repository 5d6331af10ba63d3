"""The mesh: IP plan and allocation, node identities and enrolment, job peers, desired state.

meshnet knows nothing of money or listings. When a peer is acknowledged or removed it sends a
signal (meshnet.signals) that marketplace subscribes to.

Write paths, one module per concern (each function one transaction, its docstring stating locks
and effects):

- allocation: leases of the IP plan's pools.
- enrolment: enrolment tokens, a node's signed registration, its GPU rows.
- peers: job peers added, removed and re-keyed; each change a new desired revision, pushed
  after commit through meshnet.tasks.
- desired_state: what a node should have at its desired revision, signed (read only).
- agent_channel: what an agent says over its websocket: auth, acks, removals, metering.
- nodes: heartbeats, inventory, silent nodes' removals closed out, revocation.
- notifications: after-commit messages to Channels groups (the owner's pages).

Lock order, everywhere: node row, then pool row or the node's peer keys (in id order), then,
through the signals, marketplace's orders (the whole order across both apps: docs/architecture.md).
Imports between these modules point one way; import-linter's contracts in pyproject.toml check it.
"""
