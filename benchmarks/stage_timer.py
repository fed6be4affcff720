"""Wall time per stage of a call (exclusive times, by forward hooks and function wrappers): `benchmarks/detection.py`
and `benchmarks/authors_detection_side_by_side.py` (on both sides: it imports nothing but the standard library)."""

import time
from collections import defaultdict
from collections.abc import Callable


class StageTimer:
    """Wall time per stage of the calls made while it is `active`: modules timed by forward hooks, functions of the
    package by wrappers; nested stages are subtracted from their parent (exclusive times)."""

    def __init__(self, stages: list[str]) -> None:
        self.stages = stages  # the last one takes the rest of a run's time
        self.totals: dict[str, float] = defaultdict(float)
        self.active = False
        self._stack: list[list] = []  # [stage, start, time of nested stages]

    def _enter(self) -> None:
        self._stack.append([None, time.perf_counter(), 0.0])

    def _leave(self, stage: str) -> None:
        _, start, nested = self._stack.pop()
        elapsed = time.perf_counter() - start
        self.totals[stage] += elapsed - nested
        if self._stack:
            self._stack[-1][2] += elapsed

    def module(self, module: object, stage: str) -> None:  # an nn.Module or None
        if module is None:
            return

        def enter(*args) -> None:  # hooks return None: the inputs and outputs stay as they are
            if self.active:
                self._enter()

        def leave(*args) -> None:
            if self.active:
                self._leave(stage)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)

    def function(self, owner: object, name: str, stage: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.active:
                return original(*args, **kwargs)
            self._enter()
            try:
                return original(*args, **kwargs)
            finally:
                self._leave(stage)

        setattr(owner, name, timed)

    def run(self, call: Callable[[], object]) -> tuple[float, dict[str, float], object]:
        """`call()` timed: total seconds, seconds per stage (the last stage: the rest), and its result."""
        self.totals.clear()
        self.active = True
        start = time.perf_counter()
        try:
            result = call()
        finally:
            total = time.perf_counter() - start
            self.active = False
        stages = {stage: self.totals.get(stage, 0.0) for stage in self.stages[:-1]}
        stages[self.stages[-1]] = total - sum(stages.values())
        return total, stages, result
