"""Where `make run`'s real demo nodes live (scripts/demo_nodes.py), without Django: run_dev.py
reads it before Django is set up, marketplace.demo_data when it seeds.

Each node runs in a network namespace of its own, on a bridge in 198.18.0.0/24 (RFC 2544's
benchmark range: neither the netns tests' 198.51.100.0/24 nor the NAT lab's 100.64.0.0/24, so a
test run beside `make run` collides with nothing), the host at .1, the nodes from .11 in the
demo market's order. Their WireGuard interfaces are named apart (mdemo1..): wireguard-go's UAPI
sockets in /var/run/wireguard are shared by every namespace.
"""

REAL_NODES_NET = "198.18.0"
REAL_NODES_HOST = f"{REAL_NODES_NET}.1"
REAL_NODES_PREFIX = 24
DEMO_LISTEN_PORT = 51820
