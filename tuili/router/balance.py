"""Where a request goes: which version of its model (weights, pins), then which worker (prompt
prefix affinity, bounded by load)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from tuili.router.config import Version


def stable_hash(text: str) -> int:
    """The same 64-bit value in every router process (Python's hash() is salted per process):
    replicas of the router pin a user to the same version."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


class VersionPicker:
    """Versions of one model by weight: smooth weighted round-robin (nginx's), so any run of
    requests splits as close to the weights as whole requests allow; a pinned client (a `user`)
    always gets the version its hash falls in, while that version can serve."""

    def __init__(self, versions: Sequence[Version]):
        self.versions = list(versions)
        self.current = {v.name: 0.0 for v in self.versions}

    def pick(self, available: set[str], pin: str | None = None) -> Version | None:
        """A version among `available` (names with a worker able to serve), or None."""
        live = [v for v in self.versions if v.name in available and v.weight > 0] or \
            [v for v in self.versions if v.name in available]
        if not live:
            return None
        if pin is not None:
            return self._pinned(pin, live)
        total = sum(v.weight for v in live) or len(live)
        for v in live:
            self.current[v.name] += v.weight or 1
        best = max(live, key=lambda v: self.current[v.name])
        self.current[best.name] -= total
        return best

    def _pinned(self, pin: str, live: list[Version]) -> Version:
        # against every configured version's weight, so a pin stays put while others come and go
        total = sum(v.weight for v in self.versions)
        point = stable_hash(pin) % 10**6 / 10**6 * total
        for v in self.versions:
            point -= v.weight
            if point < 0:
                return v if v in live else live[stable_hash(pin) % len(live)]
        return live[-1]


class PrefixIndex:
    """Per worker, the hashes of prompt prefixes (whole chunks of `chunk` characters, chained)
    recently sent to it: the prefixes its prefix cache most likely still holds. Bounded: the
    least recently used hashes go first."""

    def __init__(self, chunk: int, max_chunks: int, capacity: int = 100_000):
        self.chunk, self.max_chunks, self.capacity = chunk, max_chunks, capacity
        self.seen: dict[str, OrderedDict[bytes, None]] = {}

    def hashes(self, text: str) -> list[bytes]:
        """Chained hashes of text's first whole chunks: hash i covers text[: (i + 1) * chunk]."""
        h = hashlib.blake2b(digest_size=12)
        out = []
        for i in range(min(len(text) // self.chunk, self.max_chunks)):
            h.update(text[i * self.chunk:(i + 1) * self.chunk].encode("utf-8", "surrogatepass"))
            out.append(h.copy().digest())
        return out

    def match(self, worker: str, hashes: list[bytes]) -> int:
        """How many leading chunks of the prompt `worker` has been sent before."""
        seen = self.seen.get(worker)
        if not seen:
            return 0
        lo, hi = 0, len(hashes)  # chained: if chunk i matched, every chunk before it did
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in seen:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def record(self, worker: str, hashes: list[bytes]) -> None:
        seen = self.seen.setdefault(worker, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)

    def forget(self, worker: str) -> None:
        """A worker that went away lost its cache."""
        self.seen.pop(worker, None)


# A prefix's worker keeps it unless its load passes both of these beyond the least loaded's.
BALANCE_ABS = 8
BALANCE_REL = 1.5


def choose_worker(candidates: Sequence[str], load: dict[str, float], index: PrefixIndex,
                  hashes: list[bytes], turn: int) -> str:
    """The worker holding the longest prefix of the prompt when it is not much busier than the
    least loaded one; else the least loaded (ties taken in turn)."""
    least = min(load[w] for w in candidates)
    if hashes:
        best = max(candidates, key=lambda w: (index.match(w, hashes), -load[w]))
        if index.match(best, hashes) and load[best] <= max(least * BALANCE_REL,
                                                           least + BALANCE_ABS):
            return best
    idle = [w for w in candidates if load[w] == least]
    return idle[turn % len(idle)]
