"""The mesh: IP plan and allocation, node identities and enrolment, job peers, desired state.

meshnet knows nothing of money, listings or browser pages. What other apps follow it sends as
signals (meshnet.signals): a peer acknowledged, removed or metered (marketplace moves and bills
its order; frontend.realtime refreshes the order's pages), a node revoked (marketplace fails its
orders), a node changed (frontend.realtime tells its owner's pages).

Write paths, one module per concern (each function one transaction, its docstring stating locks
and effects):

- allocation: leases of the IP plan's pools.
- enrolment: enrolment tokens, a node's signed registration, its GPU rows.
- peers: job peers added, removed and re-keyed; each change a new desired revision, pushed
  after commit through meshnet.tasks.
- desired_state: what a node should have at its desired revision, signed (read only).
- agent_channel: what an agent says over its websocket: auth, acks, removals, metering.
- nodes: heartbeats, inventory, silent nodes' removals closed out, revocation.
- channel_layer: the one after-commit send to a Channels group (the agent's connection here;
  frontend.realtime uses it for the browser pages).

Lock order, everywhere: node row, then pool row or the node's peer keys (in id order), then,
through the signals, marketplace's orders (the whole order across both apps: docs/architecture.md).
Imports between these modules point one way; import-linter's contracts in pyproject.toml check it.
"""
