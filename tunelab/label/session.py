"""Who labels which item: leases, overlap, undo and progress, over the labels file.

Every item needs one label, or two from different labelers for the `overlap` items (chosen by seed).
A labeler never gets an item twice. A page (one browser tab: a `client`) asks for an item and gets a lease on
it: while the lease lives no other page gets that item, so two tabs or two labelers never hold the same item
at once. A page renews its lease by asking again (it gets the same item back); a lease left alone expires
after `lease_seconds` (a closed tab), and the item goes back to the pool.

The page is shown a `presentation`: the item's two responses in a random order, under a random id; the
labeler's choice (A, B, tie, skip) is turned into a row of the labels file from it, so which side showed which
source never leaves the server. All methods are thread-safe (one lock).
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from dataclasses import dataclass

from tunelab.label import LabelError
from tunelab.label.items import Item, Pair, Response
from tunelab.label.store import CHOICES, LabelFile, now

LEASE_SECONDS = 300.0
AHEAD = 2  # pairs generated ahead of the ones being labeled
MAX_COMMENT = 4000
MAX_NAME = 100


class RequestError(LabelError):
    """A request the session refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Presentation:
    """An item as one page sees it: A is the left response, B the right one."""

    id: str
    key: str
    client: str
    labeler: str
    a: Response
    b: Response


@dataclass
class Lease:
    client: str
    labeler: str
    expires: float
    presentation: Presentation | None = None


def overlap_keys(items: list[Item], overlap: int, seed: int) -> set[str]:
    """The keys of the items asked of two labelers: `overlap` of them, drawn by `seed` (all when larger)."""
    keys = sorted(item.key for item in items)
    if overlap >= len(keys):
        return set(keys)
    return set(random.Random(f"{seed}-overlap").sample(keys, overlap)) if overlap > 0 else set()


class LabelSession:
    """The state of one labeling server: items, their pairs, the labels so far, leases."""

    def __init__(self, items: list[Item], store: LabelFile, *, pairs: dict[str, Pair] | None = None,
                 overlap: int = 0, seed: int = 0, default_labeler: str = "labeler",
                 lease_seconds: float = LEASE_SECONDS, clock=time.monotonic):
        if not items:
            raise LabelError("there is nothing to label: the prompts are empty")
        if overlap < 0:
            raise LabelError(f"--overlap must be 0 or more, got {overlap}")
        self.items = items
        self.by_key = {item.key: item for item in items}
        self.store = store
        self.pairs: dict[str, Pair] = dict(pairs or {})
        self.generates = pairs is None  # pairs come from the generation worker
        self.required = {item.key: 1 for item in items}
        for key in overlap_keys(items, overlap, seed):
            self.required[key] = 2
        self.default_labeler = default_labeler
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.lock = threading.Condition()
        self.rows: list[dict] = []  # this session's items' labels, in file order
        self.foreign = 0  # rows of the file that belong to no item here
        self.leases: dict[str, Lease] = {}  # item key -> lease
        self.presentations: dict[str, Presentation] = {}
        self.ids: set[str] = set()
        self.failure: str | None = None
        self.preparing: str | None = None
        self.closed = False
        rows, self.repair_note = store.open()
        for row in rows:
            if row.get("item") in self.by_key and isinstance(row.get("labeler"), str):
                self._remember(row)
            else:
                self.foreign += 1
            if isinstance(row.get("id"), str):
                self.ids.add(row["id"])

    # ---- bookkeeping (call with the lock held) ----

    def _remember(self, row: dict) -> None:
        self.rows.append(row)
        if self.generates and row["item"] not in self.pairs:  # a second labeler must see the same two responses
            self.pairs[row["item"]] = Pair(Response(row.get("chosen", ""), str(row.get("chosen_source", ""))),
                                           Response(row.get("rejected", ""), str(row.get("rejected_source", ""))))

    def _labels(self, key: str) -> list[dict]:
        return [row for row in self.rows if row["item"] == key]

    def _expire(self) -> None:
        moment = self.clock()
        for key in [k for k, lease in self.leases.items() if lease.expires <= moment]:
            self._release(key)

    def _release(self, key: str) -> None:
        lease = self.leases.pop(key, None)
        if lease is not None and lease.presentation is not None:
            self.presentations.pop(lease.presentation.id, None)

    def _lease_of(self, client: str) -> str | None:
        return next((key for key, lease in self.leases.items() if lease.client == client), None)

    def _open_keys(self, labeler: str | None = None) -> list[str]:
        """Items still needing a label (from `labeler`, when given): second opinions first, then in order."""
        seconds, fresh = [], []
        counts: dict[str, list[str]] = {}
        for row in self.rows:
            counts.setdefault(row["item"], []).append(row["labeler"])
        for item in self.items:
            done = counts.get(item.key, [])
            if len(done) >= self.required[item.key] or (labeler is not None and labeler in done):
                continue
            (seconds if done else fresh).append(item.key)
        return seconds + fresh

    def progress(self, labeler: str | None = None) -> dict:
        with self.lock:
            counts: dict[str, int] = {}
            for row in self.rows:
                counts[row["item"]] = counts.get(row["item"], 0) + 1
            labeled = sum(min(self.required[key], n) for key, n in counts.items())
            total = sum(self.required.values())
            mine = sum(row["labeler"] == labeler for row in self.rows) if labeler else 0
            ahead = sum(1 for key in self._open_keys() if key in self.pairs and key not in self.leases)
            return {"labeled": labeled, "total": total, "mine": mine, "items": len(self.items),
                    "prepared_ahead": ahead}

    def _present(self, key: str, lease: Lease, sides: tuple[Response, Response] | None = None) -> Presentation:
        if lease.presentation is None:
            if sides is None:
                pair = self.pairs[key]
                sides = (pair.first, pair.second) if secrets.randbelow(2) else (pair.second, pair.first)
            lease.presentation = Presentation(secrets.token_urlsafe(12), key, lease.client, lease.labeler, *sides)
            self.presentations[lease.presentation.id] = lease.presentation
        return lease.presentation

    def _answer(self, key: str, lease: Lease, sides=None) -> dict:
        if key not in self.pairs:
            self.lock.notify_all()  # wake the generation worker
            if self.failure:
                raise RequestError(503, self.failure)
            return {"status": "preparing", "message": "preparing the responses for the next prompt..."}
        shown = self._present(key, lease, sides)
        item = self.by_key[key]
        return {"status": "item", "pair": {"id": shown.id, "prompt": item.prompt, "a": shown.a.text,
                                           "b": shown.b.text, "identical": shown.a.text == shown.b.text}}

    # ---- requests ----

    def next(self, client: str, labeler: str) -> dict:
        """The item for this page: the one it holds (lease renewed), or a new one; or why there is none."""
        labeler = self.labeler_name(labeler)
        with self.lock:
            self._expire()
            held = self._lease_of(client)
            if held is not None:
                lease = self.leases[held]
                if lease.labeler == labeler:
                    lease.expires = self.clock() + self.lease_seconds
                    return self._answer(held, lease)
                self._release(held)  # the page changed labeler: its item goes back
            mine = self._open_keys(labeler)
            free = [key for key in mine if key not in self.leases]
            if not free:
                if mine:
                    return {"status": "waiting", "message": f"the {len(mine)} items left are being labeled in "
                            "other pages right now; waiting for one to come free..."}
                left = len(self._open_keys())
                return {"status": "done", "message": "all done: every item is labeled" if not left else
                        f"all done for {labeler}: {left} items still need a second labeler"}
            key = free[0]
            lease = self.leases[key] = Lease(client, labeler, self.clock() + self.lease_seconds)
            self.lock.notify_all()
            return self._answer(key, lease)

    def release(self, client: str) -> None:
        """Give back the item this page holds (the tab is closing)."""
        with self.lock:
            held = self._lease_of(client)
            if held is not None:
                self._release(held)

    def label(self, presentation_id: str, choice: str, comment: str = "", label_id: str | None = None) -> dict:
        """Store the labeler's choice on a presentation: one row appended (fsynced) before this returns."""
        if choice not in CHOICES:
            raise RequestError(400, f"'choice' must be one of {', '.join(CHOICES)}, got {choice!r:.40}")
        if len(comment) > MAX_COMMENT:
            raise RequestError(400, f"'comment' is longer than {MAX_COMMENT} characters")
        with self.lock:
            if label_id is not None and label_id in self.ids:  # a retry of a label already saved
                return {"status": "saved", "id": label_id, "repeat": True}
            shown = self.presentations.get(presentation_id)
            if shown is None:
                raise RequestError(404, f"unknown item {presentation_id!r:.40}: it is not being shown to any page "
                                   "(the server may have restarted, or the item was given back); ask for the next one")
            done = self._labels(shown.key)
            if any(row["labeler"] == shown.labeler for row in done) or len(done) >= self.required[shown.key]:
                self._release(shown.key)
                raise RequestError(409, "this item has been labeled in another page meanwhile; ask for the next one")
            chosen, rejected = (shown.b, shown.a) if choice == "B" else (shown.a, shown.b)
            row = {"prompt": self.by_key[shown.key].prompt, "chosen": chosen.text, "rejected": rejected.text,
                   "choice": choice, "chosen_source": chosen.source, "rejected_source": rejected.source,
                   "labeler": shown.labeler, "time": now(), "comment": comment, "item": shown.key,
                   "id": label_id or secrets.token_hex(8)}
            self.store.append(row)
            self.ids.add(row["id"])
            self._remember(row)
            if self.leases.get(shown.key) and self.leases[shown.key].presentation is shown:
                self._release(shown.key)
            else:
                self.presentations.pop(shown.id, None)
            self.lock.notify_all()
            return {"status": "saved", "id": row["id"]}

    def undo(self, client: str, labeler: str) -> dict:
        """Remove the labeler's last label (atomic rewrite of the file) and show that item again to this page."""
        labeler = self.labeler_name(labeler)
        with self.lock:
            self._expire()
            last = next((row for row in reversed(self.rows) if row["labeler"] == labeler), None)
            if last is None:
                raise RequestError(409, f"nothing to undo: {labeler} has no label in the file")
            self.store.remove(last["id"])
            self.rows.remove(last)
            self.ids.discard(last["id"])
            key = last["item"]
            undone = {"id": last["id"], "choice": last["choice"], "comment": last.get("comment", "")}
            if key in self.leases and self.leases[key].client != client:
                return {"status": "undone", "undone": undone, "message": "label undone; that item is open in "
                        "another page now, so here comes the next one"}
            held = self._lease_of(client)
            if held is not None:
                self._release(held)
            lease = self.leases[key] = Lease(client, labeler, self.clock() + self.lease_seconds)
            chosen = Response(last.get("chosen", ""), str(last.get("chosen_source", "")))
            rejected = Response(last.get("rejected", ""), str(last.get("rejected_source", "")))
            answer = self._answer(key, lease, (rejected, chosen) if last["choice"] == "B" else (chosen, rejected))
            return {**answer, "undone": undone}

    def labeler_name(self, name: str | None) -> str:
        """The labeler a request names (the server's default when blank), checked."""
        name = (name or "").strip() or self.default_labeler
        if len(name) > MAX_NAME:
            raise RequestError(400, f"'labeler' is longer than {MAX_NAME} characters")
        return name

    # ---- for the generation worker ----

    def wanted(self) -> Item | None:
        """The next item whose pair should be generated, waiting until there is one; None when closing."""
        with self.lock:
            while not self.closed:
                self._expire()
                if self.failure is None:
                    leased = [key for key in self.leases if key not in self.pairs]
                    upcoming = [key for key in self._open_keys() if key not in self.leases][:AHEAD]
                    todo = leased + [key for key in upcoming if key not in self.pairs]
                    if todo:
                        self.preparing = todo[0]
                        return self.by_key[todo[0]]
                self.lock.wait(timeout=1.0)
            return None

    def prepared(self, key: str, pair: Pair) -> None:
        with self.lock:
            self.pairs.setdefault(key, pair)
            self.preparing = None
            self.lock.notify_all()

    def failed(self, message: str) -> None:
        with self.lock:
            self.failure = message
            self.preparing = None
            self.lock.notify_all()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        self.store.close()
