"""The mesh: IP plan and allocation, node identities and enrolment, job peers, desired state.

meshnet knows nothing of money or listings. When a peer is acknowledged or removed it sends a
signal (meshnet.signals) that marketplace subscribes to.
"""
