"""The market in the Django admin.

Money and lifecycle rows are read-only here: the ledger is append-only and every balance is a
cache of its entries, and an order moves only through marketplace.lifecycle. Operators act
through actions that call the write paths: grant credits (on users), pause or resume listings, stop
orders, reverse a transaction, resolve disputes, decide payouts. Amounts are integers of micro-USD
and shown in USD.

Split by what an operator looks at: accounts (users, tokens), market (listings, orders), ledger,
payments (earnings, disputes, payouts), clusters (multi-node orders), card_payments (Stripe
Checkout top-ups); common holds what they share. Django's admin autodiscovery imports this
package, and each module registers its pages.
"""

from marketplace.admin import (  # noqa: F401  (registrations)
    accounts,
    card_payments,
    clusters,
    ledger,
    market,
    payments,
)
