"""The global read position of an endless sequence of items (a source's units, SFT windows) that data-parallel
ranks share: saved once for all ranks, so a run resumes on any number of ranks without reading an item twice or
skipping one.

Items are numbered 0, 1, 2, ... across epochs. A position says: every item below `frontier` is consumed, and so is
every item in `done`; `partial` maps an item begun but not finished to the number of its records consumed. The
items still open (from the frontier on, skipping `done`) are dealt round robin: rank r of W takes open items r,
r + W, r + 2W, ... Ranks consume at different rates (documents differ in length), so merging the ranks' progress at
a checkpoint moves the frontier to the first item some rank had not finished and records the faster ranks' extra
items in `done` (at most W times the spread between ranks, in items). A checkpoint keeps the position the run
started from and every rank's progress: resumed on the same world size each rank continues exactly where it stopped
(the windows of an uninterrupted run), on another world size the ranks continue from the merged position.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GlobalPosition:
    frontier: int = 0
    done: tuple[int, ...] = ()  # sorted, all >= frontier
    partial: dict[int, int] = field(default_factory=dict)  # item -> records consumed

    def item(self, open_index: int) -> int:
        """The item number of the `open_index`-th open item."""
        item = self.frontier + open_index
        for done in self.done:
            if done > item:
                break
            item += 1
        return item

    def merge(self, progress: list[tuple[int, int]]) -> GlobalPosition:
        """The position after rank r of W = len(progress), which started from this one, finished progress[r][0]
        of its items and consumed progress[r][1] records of the next."""
        world = len(progress)
        everyone_finished = min(finished for finished, _ in progress)
        frontier = self.item(everyone_finished * world)  # open items below everyone_finished * W are all consumed
        done = {d for d in self.done if d >= frontier}
        for rank, (finished, _) in enumerate(progress):
            done.update(self.item(rank + m * world) for m in range(everyone_finished, finished))
        partial = {item: n for item, n in self.partial.items() if item >= frontier and item not in done}
        for rank, (finished, consumed) in enumerate(progress):
            if consumed:
                partial[self.item(rank + finished * world)] = consumed
        while frontier in done:
            done.remove(frontier)
            frontier += 1
        return GlobalPosition(frontier, tuple(sorted(done)), partial)


class RankCursor:
    """Rank r of W's walk over the open items of a position: `finished` items done, `consumed` records of the
    next one (an item left partial by the previous run starts where that run stopped)."""

    def __init__(self, rank: int, world: int, position: GlobalPosition | None = None):
        self.rank, self.world = rank, world
        self.restart(position or GlobalPosition())

    def restart(self, position: GlobalPosition) -> None:
        self.position, self.finished = position, 0
        self.consumed = position.partial.get(self.item(), 0)

    def load(self, position: GlobalPosition, progress: list[tuple[int, int]]) -> None:
        """Continue after the ranks of a run that started from `position` made `progress` (one entry a rank):
        on the same world size each rank exactly where it stopped, on another one from the merged position."""
        if len(progress) == self.world:
            self.position = position
            self.finished, self.consumed = progress[self.rank]
        else:
            self.restart(position.merge(progress))

    def item(self) -> int:
        return self.position.item(self.rank + self.finished * self.world)

    def next_item(self) -> None:
        self.finished += 1
        self.consumed = self.position.partial.get(self.item(), 0)

    def progress(self) -> tuple[int, int]:
        return self.finished, self.consumed
