"""Hooks meshnet fires so that other apps can follow peers without meshnet importing them.

Sent inside the acknowledging transaction: a receiver's writes commit or roll back with it.
"""

from django.dispatch import Signal

# kwargs: job_peer (meshnet.models.JobPeer), at (datetime)
peer_acknowledged = Signal()
peer_removed = Signal()

# kwargs: job_peer, rx_bytes, tx_bytes (new bytes since the last sample; rx = provider received)
peer_traffic = Signal()

# kwargs: node (meshnet.models.Node, already revoked and committed), reason (str). Sent outside
# any lock by meshnet.nodes.revoke_node; receivers end whatever ran on the node.
node_revoked = Signal()

# kwargs: node (meshnet.models.Node), change (str: "enrolled", "online", "inventory",
# "revoked"). Sent inside the writing transaction whenever what a node's owner sees of it
# changes; frontend.realtime tells the owner's open pages after commit.
node_changed = Signal()

# kwargs: sandbox (meshnet.models.Sandbox, as committed). Sent after the transaction that changed
# the sandbox's state or report commits (meshnet.sandboxes): the agent's SANDBOX_STATUS, or the
# sandbox stopped because its peer is gone. marketplace moves the job's order; frontend.realtime
# tells the order's and the owner's open pages.
sandbox_changed = Signal()

# kwargs: node_pk (int). Sent inside the transaction that changed what a node's desired state
# says without going through meshnet.peers (the hub storing a buyer's new mapping, which the
# job peer's endpoint follows): meshnet.peers bumps the node's revision and pushes after commit.
desired_state_changed = Signal()
