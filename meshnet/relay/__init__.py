"""The relay: a process of its own that forwards WireGuard ciphertext between a buyer and a
provider whose NATs cannot be punched (docs/nat.md, step 3).

No Django here: a relay runs on its own host (per region, several per deployment) with
`python -m meshnet.relay` and holds no database credentials and no private key; it learns its
port pairs from the gateway's control API (or a file) and the two peers' *public* keys, which
it uses only to check handshake messages' mac1 (as any WireGuard responder's DoS guard can).

- wgmsg: WireGuard's four message types, parsed and mac1-checked (pure).
- pairs: one port pair's state: where each side is, learned from handshakes (pure).
- fastpath: the nftables ruleset that lets the kernel forward a known pair (pure render).
- server: the asyncio process: sockets, allocations, the fast path applied.
"""
