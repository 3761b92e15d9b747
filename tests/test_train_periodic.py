"""The trainer's periodic actions as a schedule (``mcf.train.trainer.due_after`` / ``due_at_end``): which
actions run after which optimizer step, in which order, at the last step and after a resume."""

from __future__ import annotations

from mcf.train.trainer import due_after, due_at_end

EVERY = {"log": 2, "reconstructions": 3, "monitor": 0, "checkpoint": 4}


def run_plan(first: int, total: int, every: dict[str, int]) -> dict[int, tuple[str, ...]]:
    """The actions after each step of a run from step ``first`` (a resume when > 0) to ``total``, as the
    trainer's loop draws them: ``due_after`` per step, then ``due_at_end`` after the last one."""
    last_saved = first if first > 0 else -1
    plan = {}
    for step in range(first + 1, total + 1):
        plan[step] = due_after(step, total, every)
        if "checkpoint" in plan[step]:
            last_saved = step
    end = due_at_end(total, every, last_saved, trained=first < total)
    plan[total] = plan.get(total, ()) + end
    return plan


def test_each_action_on_its_period_in_the_loops_order():
    assert [due_after(s, 100, EVERY) for s in range(1, 7)] == [
        (), ("log",), ("reconstructions",), ("log", "checkpoint"), (), ("log", "reconstructions")]
    every = {"log": 1, "reconstructions": 1, "monitor": 1, "checkpoint": 1}
    assert due_after(7, 100, every) == ("log", "reconstructions", "monitor", "checkpoint")
    assert "monitor" in due_after(5, 100, {**EVERY, "monitor": 5})


def test_the_last_step_is_always_logged_and_closed_by_the_end_of_run():
    # step 7 of 7: off every period, yet logged; the final checkpoint and reconstructions come at the end
    assert due_after(7, 7, EVERY) == ("log",)
    assert due_at_end(7, EVERY, last_saved=4, trained=True) == ("checkpoint", "reconstructions")
    # step 12 of 12: the periodic checkpoint and reconstructions are not repeated at the end
    assert due_after(12, 12, EVERY) == ("log", "reconstructions", "checkpoint")
    assert due_at_end(12, EVERY, last_saved=12, trained=True) == ()
    # reconstructions off (0): only the end of the run draws them
    assert due_at_end(12, {**EVERY, "reconstructions": 0}, last_saved=12, trained=True) == ("reconstructions",)


def test_a_resumed_run_keeps_the_schedule_and_adds_nothing_when_already_done():
    whole = run_plan(0, 10, EVERY)
    first, second = run_plan(0, 6, EVERY), run_plan(6, 10, EVERY)
    assert {s: second[s] for s in range(7, 11)} == {s: whole[s] for s in range(7, 11)}
    assert first[6] == ("log", "reconstructions", "checkpoint")  # the interrupted run's end (max_steps=6)
    # resumed from the final checkpoint: no step, so no new checkpoint and no reconstructions of an empty batch
    assert due_at_end(10, EVERY, last_saved=10, trained=False) == ()
