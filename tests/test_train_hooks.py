"""The loop's periodic work: ``Hooks.add(fn, every=N, at_end=...)`` runs ``fn`` after every
N-th step and, when asked, after the last one."""

from __future__ import annotations

import pytest

from tapo_jax.train.rl_loop import Hooks, StepInfo


def _run(hooks: Hooks, steps: int, start: int = 0) -> None:
    for step in range(start, steps):
        hooks.run(StepInfo(step + 1, state=None, metrics={}, examples=[],
                           last=step + 1 == steps))


def test_hooks_run_every_n_steps_and_at_the_end():
    seen: dict[str, list[int]] = {"each": [], "third": [], "third_end": []}
    hooks = Hooks()
    hooks.add(lambda info: seen["each"].append(info.step))
    hooks.add(lambda info: seen["third"].append(info.step), every=3)
    hooks.add(lambda info: seen["third_end"].append(info.step), every=3, at_end=True)
    _run(hooks, 7)
    assert seen == {"each": [1, 2, 3, 4, 5, 6, 7], "third": [3, 6], "third_end": [3, 6, 7]}


def test_hooks_count_steps_from_the_run_start_after_a_resume():
    """A resumed run (start = 4) saves on the same steps as the uninterrupted one."""
    seen: list[int] = []
    hooks = Hooks()
    hooks.add(lambda info: seen.append(info.step), every=2, at_end=True)
    _run(hooks, 7, start=4)
    assert seen == [6, 7]


def test_hooks_refuse_a_period_below_one():
    with pytest.raises(ValueError, match="every=0"):
        Hooks().add(lambda info: None, every=0)
