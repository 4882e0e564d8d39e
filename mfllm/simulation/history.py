"""What the population has done so far, as the methods' contexts need it (bounded memory).

Only the last `window` actions are kept (recent uses 5, popular 30), plus the number of reposts
each of them has received so far, so memory stays flat however large the population.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(slots=True)
class HistoryItem:
    action_id: str
    text: str  # real text in warm-up (and under teacher forcing), simulated text in rollout
    followers: int | None
    time: float
    order: int  # position in the event, for stable tie-breaking


class History:
    def __init__(self, window: int = 30):
        self.window = window
        self.items: deque[HistoryItem] = deque(maxlen=window)
        self.reposts_received: dict[str, int] = {}
        self.total = 0

    def add(self, action_id: str, text: str, parent: str | None, followers: int | None, time: float) -> None:
        if parent is not None and parent in self.reposts_received:
            self.reposts_received[parent] += 1
        if len(self.items) == self.items.maxlen:
            self.reposts_received.pop(self.items[0].action_id, None)
        self.items.append(HistoryItem(action_id, text, followers, time, self.total))
        self.reposts_received[action_id] = 0
        self.total += 1

    def last(self, k: int) -> list[HistoryItem]:
        return list(self.items)[-k:] if k > 0 else []

    def reach(self, item: HistoryItem) -> tuple[int, int]:
        """Reach = followers where the data has them, plus reposts received so far.

        CED reposters have no follower counts, so there reach is the number of reposts the action has
        received so far within the event (from the real cascade's parent links); ties go to the newer one.
        """
        return ((item.followers or 0) + self.reposts_received.get(item.action_id, 0), item.order)
