"""Stop sequences found while text streams in, in time linear in the text (Aho-Corasick).

Generation checks its stop strings after every token. Searching the whole text for every stop
string each time, and testing each prefix of each stop string against the text's end, costs
O(|text| + sum |stop|^2) per token; a long stop string then slows every token of a session (a 50k
character stop cost 61 ms per token). A `StopMatcher` reads each new character once, in
amortized O(1), whatever the number and lengths of the stop strings; building it costs
O(sum |stop|).
"""

from __future__ import annotations

from collections import deque


class StopMatcher:
    """Feeds a growing text chunk by chunk and reports the first stop sequence in it.

    `feed(chunk)` returns the index in the whole text (everything fed so far) where the earliest
    starting stop sequence begins, if one has now appeared, else None. `held` is the length of
    the longest end of the text that is the start of a stop sequence: characters that may still
    turn into a stop, which a streaming caller holds back until they are decided.
    """

    def __init__(self, stops: tuple[str, ...] | list[str]):
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        # The trie: goto[state] maps a character to the next state; state 0 is the root.
        self._goto: list[dict[str, int]] = [{}]
        self._depth = [0]
        # Length of the longest stop sequence ending at this state (0: none ends here).
        self._match = [0]
        for s in stops:
            state = 0
            for ch in s:
                nxt = self._goto[state].get(ch)
                if nxt is None:
                    nxt = len(self._goto)
                    self._goto[state][ch] = nxt
                    self._goto.append({})
                    self._depth.append(self._depth[state] + 1)
                    self._match.append(0)
                state = nxt
            self._match[state] = len(s)
        # Failure links, breadth first: the longest proper suffix of a state's string that is
        # also a state. A state's longest match is its own, else its failure state's.
        self._fail = [0] * len(self._goto)
        queue = deque(self._goto[0].values())  # depth 1: failure state is the root
        while queue:
            state = queue.popleft()
            for ch, nxt in self._goto[state].items():
                f = self._fail[state]
                while f and ch not in self._goto[f]:
                    f = self._fail[f]
                self._fail[nxt] = self._goto[f].get(ch, 0)
                if not self._match[nxt]:
                    self._match[nxt] = self._match[self._fail[nxt]]
                queue.append(nxt)
        self._state = 0
        self._pos = 0  # characters fed so far
        self.hit: int | None = None

    @property
    def held(self) -> int:
        return 0 if self.hit is not None else self._depth[self._state]

    def feed(self, chunk: str) -> int | None:
        """Reads `chunk`; returns where the first stop sequence starts (in the whole text), or
        None. Once a stop was found, later chunks change nothing."""
        if self.hit is not None or not self._goto[0]:
            self._pos += len(chunk)
            return self.hit
        goto, fail, match = self._goto, self._fail, self._match
        state, best = self._state, None
        for i, ch in enumerate(chunk, start=self._pos):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if match[state]:
                start = i + 1 - match[state]
                # Matches end in this chunk only (none did before): keep scanning it, so the
                # earliest *starting* one wins, as a search of the whole text would find.
                best = start if best is None else min(best, start)
        self._state, self._pos = state, self._pos + len(chunk)
        self.hit = best
        return best
