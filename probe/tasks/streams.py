"""The training stream every generated task draws from: problems never in its held-out split,
deterministic in (seed, index), so a resumed stream continues exactly where it stopped."""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterator
from typing import TypeVar

P = TypeVar("P")


def training_stream(draw: Callable[[random.Random], P], key: Callable[[P], Hashable], held: set,
                    seed: int, start: int = 0) -> Iterator[tuple[int, P, random.Random]]:
    """(i, problem, rng) for i = start, start + 1, ...: problem i is `draw(rng)` with
    `rng = random.Random(f"{seed}:{i}")`, redrawn from the same rng while its `key` is in `held` (the
    held-out keys); `rng` is returned for drawing more from problem i (e.g. a solution)."""
    i = start
    while True:
        rng = random.Random(f"{seed}:{i}")
        while True:
            p = draw(rng)
            if key(p) not in held:
                break
        yield i, p, rng
        i += 1
