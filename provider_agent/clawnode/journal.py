"""Each peer's metering epoch, kept in the state directory so that no restart bills a byte twice.

An epoch names one run of a peer's counters: a peer (re-)added starts its counters at zero and
gets a new epoch, so the gateway never takes a reset for traffic. Epochs come from one counter
that only grows and is saved with them, so a key whose entry was forgotten (a removed peer) and
is added again later gets a higher epoch than any it had: the gateway takes a lower epoch for a
late sample and would count nothing.

Epochs are written in two steps, so that adding a peer costs no fsync:

- Before a peer is added, its new epoch is appended to epochs.journal, without fsync
  (``hand_out``). The kernel has the line once the write returns, so it survives the agent
  dying at any point after; only a power cut or a kernel crash can lose it.
- Before any metering sample carries an epoch that is only in the journal, epochs.json is
  rewritten with fsync (``make_durable``, ``save``) and the journal emptied.

Why this bills every byte once:

- The gateway only learns an epoch from a sample, and by then the epoch, and a next_epoch
  above it, are durable. So after any restart next_epoch is above every epoch the gateway
  has seen; an epoch lost with a power cut was never seen and may be handed out again.
- Agent restarted, machine up: the interface kept its peers and their counters. A peer
  added since the last fsync has its epoch in the journal (written before the device had
  the peer), so the restarted agent reports it with that epoch, which is new to the
  gateway (no sample ever carried it): the gateway counts the peer's counters from zero,
  which is where they started when the peer was added. This holds for a key that had an
  older epoch in epochs.json too (removed, then added again): the journal line, newer,
  wins over it.
- Power cut or kernel crash: the interface is gone with its peers and counters, so no
  peer is reported with an epoch that was lost; the gateway sends the full state again
  and every peer is added afresh, with an epoch above any the gateway has seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .state import append_private, write_private_atomically

__all__ = ["EPOCHS_FILE", "EPOCHS_JOURNAL", "EpochJournal"]

EPOCHS_FILE = "epochs.json"
EPOCHS_JOURNAL = "epochs.journal"
# One journal line: a peer's base64 key and the epoch handed to it.
_JOURNAL_LINE = re.compile(rb"([A-Za-z0-9+/]{43}=) ([0-9]{1,18})")


class EpochJournal:
    """The epochs of the peers in the state directory ``path`` (epochs.json and its journal).

    ``epochs``: each peer's epoch; ``next_epoch``: the next to hand out; ``durable_epoch``: the
    first not yet in epochs.json (from there on they are only in the journal); ``unsaved``:
    something was forgotten since epochs.json was last written.
    """

    def __init__(self, path: Path) -> None:
        self.epochs_path = path / EPOCHS_FILE
        self.journal_path = path / EPOCHS_JOURNAL
        self.epochs, self.next_epoch, self.durable_epoch = self._load()
        self.unsaved = False

    def epoch(self, key: str) -> int:
        """The peer's epoch; 0 for a peer the agent never added (one added by hand)."""
        return self.epochs.get(key, 0)

    def _load(self) -> tuple[dict[str, int], int, int]:
        """(epoch of each peer, the next epoch to hand out, the first epoch not yet durable).

        epochs.json is read first, then the journal's lines for epochs handed out after it was
        written: a line with a lower epoch is already in epochs.json (the journal is emptied
        after epochs.json is written, but a crash can come between the two).
        """
        epochs: dict[str, int]
        try:
            data = json.loads(self.epochs_path.read_text())
        except FileNotFoundError:
            epochs, following = {}, 1
        except ValueError:
            # A corrupt file must not double-bill: bumping every epoch makes the gateway count
            # from zero only if the counters really restarted, which it also detects itself.
            epochs, following = {}, 1
        else:
            if isinstance(data, dict) and "next_epoch" in data:
                epochs = {str(k): int(v) for k, v in data.get("peers", {}).items()}
                following = int(data["next_epoch"])
            else:  # the first format: {key: epoch}, never pruned
                epochs = {str(k): int(v) for k, v in data.items()}
                following = 1
        durable = max(following, max(epochs.values(), default=0) + 1)
        journal = self._read_journal(durable)
        epochs.update(journal)
        return epochs, max(durable, max(journal.values(), default=0) + 1), durable

    def _read_journal(self, durable: int) -> dict[str, int]:
        """The journal's epochs from `durable` on, in the order written (a later line for the
        same key wins). Reading stops at the first line that is not whole: a power cut can
        leave the end of the file short or unwritten."""
        try:
            data = self.journal_path.read_bytes()
        except FileNotFoundError:
            return {}
        found: dict[str, int] = {}
        for line in data.split(b"\n")[:-1]:  # what follows the last newline was cut short
            match = _JOURNAL_LINE.fullmatch(line)
            if match is None:
                break
            epoch = int(match[2])
            if epoch >= durable:
                found[match[1].decode("ascii")] = epoch
        return found

    def hand_out(self, keys: Iterable[str]) -> None:
        """New epochs for peers about to be added, journaled before the device has the peers
        (see above): a crash after a peer is added never leaves it without its epoch."""
        lines = []
        for key in keys:
            self.epochs[key] = self.next_epoch
            lines.append(f"{key} {self.next_epoch}\n")
            self.next_epoch += 1
        if lines:
            append_private(self.journal_path, "".join(lines).encode("ascii"))

    def save(self) -> None:
        """Write epochs.json durably (fsync), then empty the journal it now covers."""
        self.unsaved = False
        data = {"next_epoch": self.next_epoch, "peers": self.epochs}
        write_private_atomically(
            self.epochs_path, (json.dumps(data, sort_keys=True) + "\n").encode()
        )
        self.durable_epoch = self.next_epoch
        # Left as it was, the journal's lines are all below next_epoch: the next load skips them.
        with contextlib.suppress(OSError):
            os.truncate(self.journal_path, 0)

    def make_durable(self, keys: Iterable[str]) -> None:
        """Before a sample carries these keys' epochs: any of them not yet durable is made so."""
        durable = self.durable_epoch
        if self.next_epoch > durable and any(self.epochs.get(k, 0) >= durable for k in keys):
            self.save()

    def forget(self, keys: Iterable[str]) -> bool:
        """Forget the epochs of peers gone for good; True when something was forgotten.

        Forgetting need not be durable at once (a forgotten epoch is never handed out again
        either way): it is saved with the next sample (``unsaved``)."""
        forgotten = False
        for key in keys:
            if self.epochs.pop(key, None) is not None:
                forgotten = True
        if forgotten:
            self.unsaved = True
        return forgotten
