"""clawnode: the MOLT provider agent.

``keys`` and the ``wire`` package are pure (stdlib + PyNaCl) and shared with the gateway, which
imports them to check enrolments and to sign desired state. The module list, and where the
sandbox engine goes (``sandbox/``, beside ``backends/``), is in provider_agent/README.md.
"""

__version__ = "0.1.0"
