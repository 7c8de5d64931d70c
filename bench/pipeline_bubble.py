"""Pipeline bubble fraction of each schedule torchtitan ships, from torch's own action tables.

`python bench/pipeline_bubble.py [--pp 2 4 8] [--microbatches 8 16 32]`

For each schedule, PP degree and microbatch count, torch builds the schedule's per-rank action table
(`_schedule_visualizer.get_schedule_ops`, the table the schedule runs from; for 1F1B, whose displayed table is off
by one microbatch on the last stage in torch 2.13, the order its runtime loop follows). This script then times it: each rank
runs its actions in the table's order, an action starts when its rank is free and its dependencies are done
(forward of microbatch m on stage s after stage s - 1's; input-gradient backward after stage s + 1's and the same
stage's forward; weight-gradient backward after the input one), with costs forward 1, full backward 2, input or
weight backward 1 each (an overlapped forward-backward pair runs one after the other); communication and gradient
reduction cost nothing. The bubble fraction is the idle share of
ranks x makespan. Looped schedules get 2 stages per rank (torchtitan's default). The ratio column compares each
schedule with GPipe at the same PP degree and microbatch count (lower is better).
"""

from __future__ import annotations

import argparse

from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
from torch.distributed.pipelining.schedules import (BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD, FULL_BACKWARD,
                                                     PipelineScheduleSingle, _Action, get_schedule_class)

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


COST = {FORWARD: 1, FULL_BACKWARD: 2, BACKWARD_INPUT: 1, BACKWARD_WEIGHT: 1}


def _dependencies(action: _Action, num_stages: int) -> list[tuple[int, str, int]]:
    """Keys (stage, "F" forward done | "I" input gradient done | "W", microbatch) `action` waits for."""
    stage, kind, mb = action.stage_index, action.computation_type, action.microbatch_index
    if kind == FORWARD:
        return [(stage - 1, "F", mb)] if stage > 0 else []
    if kind == BACKWARD_WEIGHT:
        return [(stage, "I", mb)]
    return [(stage, "F", mb)] + ([(stage + 1, "I", mb)] if stage < num_stages - 1 else [])


def _one_f_one_b(pp: int, microbatches: int) -> list[list[_Action]]:
    """1F1B's order as torch's Schedule1F1B runs it (num_stages - stage forwards, then backward / forward
    alternating, then the remaining backwards). Its `_get_pipeline_order` table, used only for display, numbers the
    last stage's forwards from 1 (torch 2.13)."""
    table = []
    for stage in range(pp):
        warmup = min(microbatches, pp - stage)
        actions = [_Action(stage, FORWARD, mb) for mb in range(warmup)]
        for backward in range(microbatches):
            actions.append(_Action(stage, FULL_BACKWARD, backward))
            if warmup + backward < microbatches:
                actions.append(_Action(stage, FORWARD, warmup + backward))
        table.append(actions)
    return table


def bubble_fraction(schedule: str, pp: int, microbatches: int) -> float:
    single = issubclass(get_schedule_class(schedule), PipelineScheduleSingle)
    stages_per_rank = 1 if single else 2
    table = (_one_f_one_b(pp, microbatches) if schedule == "1F1B"
             else get_schedule_ops(schedule, pp, microbatches, num_stages_per_rank=stages_per_rank))
    # an OVERLAP_F_B action (1F1B's steady state, DualPipeV) runs its forward and backward one after the other
    actions = [[sub for a in rank if a is not None for sub in (a.sub_actions or (a,)) if sub.computation_type in COST]
               for rank in table]
    num_stages = pp * stages_per_rank
    done: dict[tuple[int, str, int], int] = {}
    position, free, busy = [0] * pp, [0] * pp, [0] * pp
    while any(position[r] < len(actions[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while position[r] < len(actions[r]):
                action = actions[r][position[r]]
                dependencies = _dependencies(action, num_stages)
                if any(d not in done for d in dependencies):
                    break
                cost = COST[action.computation_type]
                end = max([free[r], *(done[d] for d in dependencies)]) + cost
                kind = {FULL_BACKWARD: "I"}.get(action.computation_type, action.computation_type.value)
                done[(action.stage_index, kind, action.microbatch_index)] = end
                free[r], busy[r] = end, busy[r] + cost
                position[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"{schedule}: the action table deadlocks under this dependency model")
    makespan = max(free)
    return 1 - sum(busy) / (pp * makespan)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[8, 16, 32])
    args = parser.parse_args()
    print(f"{'schedule':<22} {'pp':>3} {'microbatches':>12} {'bubble':>8} {'vs GPipe':>9}")
    for pp in args.pp:
        for microbatches in args.microbatches:
            gpipe = bubble_fraction("GPipe", pp, microbatches)
            for schedule in SCHEDULES:
                try:
                    fraction = bubble_fraction(schedule, pp, microbatches)
                except (ValueError, AssertionError, RuntimeError) as err:  # a schedule's own constraint on pp / microbatches
                    print(f"{schedule:<22} {pp:>3} {microbatches:>12}   n/a ({str(err).splitlines()[0][:60]})")
                    continue
                print(f"{schedule:<22} {pp:>3} {microbatches:>12} {fraction:>8.3f} {fraction / gpipe:>9.2f}")


if __name__ == "__main__":
    main()
