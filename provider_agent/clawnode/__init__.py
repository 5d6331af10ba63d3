"""clawnode: the MOLT provider agent.

``keys`` and ``protocol`` are pure (stdlib + PyNaCl) and shared with the gateway, which imports
them to check enrolments and to sign desired state.
"""

__version__ = "0.1.0"
