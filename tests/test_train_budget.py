"""Training sized by a time budget (``train.time_budget_s``, pipeline.budget): durations, the plan on
a fake clock (no timed asserts), re-plans at each epoch's start, and one real 2-rank run whose
logged plans are consistent, agreed by both ranks and carried across a restart."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import small_config
from pipeline.budget import StepPlan, StepTimer, format_duration, parse_duration, plan_steps
from pipeline.checkpoint import load_state
from pipeline.config import ConfigError, load_config, parse_overrides
from pipeline.hooks import HookList, RecordReads, TrainHooks
from pipeline.tracking import get_or_create_experiment
from pipeline.train import build_trainer, epoch_line


@pytest.mark.parametrize("value, seconds", [
    (7200, 7200.0), (90.5, 90.5), ("7200", 7200.0), ("2h", 7200.0), ("90m", 5400.0), ("90min", 5400.0),
    ("1h30m", 5400.0), ("1h 30m 15s", 5415.0), ("45s", 45.0), ("1.5h", 5400.0), (" 2H ", 7200.0),
])
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["2x", "", "h", "2 hours", "1h-30m", 0, -5, "0s", True, float("inf")])
def test_bad_durations(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 95.3, 3599, 7260, -12)] == ["0s", "59s", "1m35s", "59m59s", "2h01m", "-12s"]


def test_config_takes_a_budget_as_seconds_or_with_units(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{shards: {tmp_path}}}\ntrain: {{time_budget_s: 2h}}\nscaling: {{num_workers: 1}}\n")
    assert load_config(config, available_cpus=2).train.time_budget_s == 7200.0
    assert load_config(config, parse_overrides(["train.time_budget_s=90m"]), available_cpus=2).train.time_budget_s == 5400.0
    assert load_config(config, parse_overrides(["train.time_budget_s=240"]), available_cpus=2).train.time_budget_s == 240.0
    with pytest.raises(ConfigError) as e:
        load_config(config, parse_overrides(["train.time_budget_s=2 days"]), available_cpus=2)
    assert str(e.value).splitlines()[-1].strip() == (
        f"{config}: train.time_budget_s: expected a positive duration: seconds, or a string like '2h', '90m', "
        "'1h30m', got '2 days'")


def test_a_sweep_file_gives_each_architecture_its_own_budget(tmp_path):
    from pipeline.config import load_sweep

    models = Path(__file__).resolve().parents[1] / "configs" / "models"
    config = tmp_path / "s.yaml"
    config.write_text(f"""
data: {{shards: {tmp_path}}}
train: {{time_budget_s: 60}}
sweep:
  models_dir: {models}
  architectures:
    hardnet: {{overrides: {{train.time_budget_s: 4m}}}}
    tfeat: {{}}
""")
    assert [c.train.time_budget_s for c in load_sweep(config, available_cpus=2)] == [240.0, 60.0]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _simulate(budget_s: float, epochs: int, step_s: float, eval_s: float, start_up_s: float, warmup: int, probe: int):
    """A whole run on a fake clock: start-up, slow warm-up steps, the probe, the plan, the remaining
    steps and an evaluation per epoch. Returns the plan and when the run ended (from its start)."""
    clock = FakeClock()
    start = clock.now
    clock.now += start_up_s
    timer = StepTimer(warmup, probe, clock)
    timer.start()
    steps = 0
    while not timer.step_done(steps):  # the first epoch, until the timer has its figure
        clock.now += step_s * (4.0 if steps < warmup else 1.0)  # warm-up steps are slow, and not timed
        steps += 1
    assert timer.step_s == pytest.approx(step_s)
    plan = plan_steps(budget_s=budget_s, elapsed_s=clock.now - start, steps_done=steps, step_s=timer.step_s,
                      eval_s=eval_s, epochs=epochs, pairs_per_step=128)
    clock.now += (plan.total_steps - steps) * step_s + epochs * eval_s
    return plan, clock.now - start


@pytest.mark.parametrize("budget_s, epochs, step_s, eval_s", [
    (240, 3, 0.4, 3.0), (7200, 10, 0.05, 20.0), (60, 1, 0.21, 1.5), (100, 4, 1.3, 0.0),
])
def test_the_plan_fills_the_budget_and_ends_within_it(budget_s, epochs, step_s, eval_s):
    plan, ended = _simulate(budget_s, epochs, step_s, eval_s, start_up_s=9.0, warmup=3, probe=10)
    assert plan.fits and plan.epochs == epochs and plan.total_steps == epochs * plan.batches_per_epoch
    assert ended == pytest.approx(plan.projected_s) and ended <= budget_s + 1e-9
    # what is left is less than one step per epoch (the total is cut to a multiple of the epochs)
    assert budget_s - ended < epochs * step_s
    assert plan.pairs_per_s == pytest.approx(128 / step_s)


def test_a_budget_smaller_than_the_probe_keeps_the_steps_taken_and_says_it_does_not_fit():
    plan, ended = _simulate(20, 3, 1.0, 5.0, start_up_s=9.0, warmup=3, probe=10)
    assert plan.batches_per_epoch == 13 and not plan.fits and ended > 20  # the probe's 13 steps are the first epoch


def _run_with_replans(budget_s: float, epochs: int, step_s: float, eval_s: float, probe_slowdown: float,
                      replan: bool):
    """A whole run on a fake clock whose probe steps ran ``probe_slowdown`` times slower than the
    rest (other load on the machine at that moment), re-planned at every later epoch's start from
    the previous epoch's measured step and epoch-end times as the trainer does, or not. Returns the
    plans, when the run ended and the lr scale before every step."""
    clock, warmup, probe = FakeClock(), 3, 10
    start = clock.now
    clock.now += 9.0
    timer = StepTimer(warmup, probe, clock)
    timer.start()
    steps = 0
    while not timer.step_done(steps):
        clock.now += step_s * (4.0 if steps < warmup else probe_slowdown)
        steps += 1
    plans = [plan_steps(budget_s=budget_s, elapsed_s=clock.now - start, steps_done=steps, step_s=timer.step_s,
                        eval_s=eval_s, epochs=epochs, pairs_per_step=128)]
    scales = [1.0] * steps
    for epoch in range(epochs):
        plan = plans[-1]
        if epoch > 0 and replan:
            old = plan
            plan = plan_steps(budget_s=budget_s, elapsed_s=clock.now - start, steps_done=steps, step_s=step_s,
                              eval_s=eval_s, epochs=epochs, pairs_per_step=128, epochs_done=epoch,
                              lr_start_step=steps, lr_start_scale=old.lr_scale(steps))
            plans.append(plan)
        in_epoch = steps if epoch == 0 else 0  # the first epoch holds the probe's steps
        while in_epoch < plan.batches_per_epoch:
            scales.append(plan.lr_scale(steps))
            clock.now += step_s
            steps += 1
            in_epoch += 1
        clock.now += eval_s
    assert steps == plans[-1].total_steps
    return plans, clock.now - start, scales


@pytest.mark.parametrize("budget_s, epochs, step_s, eval_s", [(2700, 6, 0.55, 12.0), (150, 3, 0.2, 4.0)])
def test_a_probe_slowed_by_passing_load_is_corrected_at_the_next_epoch(budget_s, epochs, step_s, eval_s):
    # make reference's case: the probe ran beside another job at half speed; the plan made from it
    # alone ends the run with about half of its budget unused
    plans, ended, _ = _run_with_replans(budget_s, epochs, step_s, eval_s, probe_slowdown=2.2, replan=False)
    assert ended < 0.6 * budget_s
    plans, ended, scales = _run_with_replans(budget_s, epochs, step_s, eval_s, probe_slowdown=2.2, replan=True)
    assert len(plans) == epochs and [p.epochs_done for p in plans] == list(range(epochs))
    # with re-plans the run ends within the budget, short of it by less than one step per epoch left
    # after the first (the first epoch is the slow plan's)
    assert ended <= budget_s + 1e-9 and budget_s - ended < (epochs - 1) * step_s
    assert plans[-1].fits and ended == pytest.approx(plans[-1].projected_s)
    # the lr schedule goes on without a jump: never up, never down by more than the steepest plan's
    # step (the first, shortest one), and its last step is the last before zero
    steady = scales[plans[0].steps_done:]  # the probe's steps ran at the base lr, before any plan
    gaps = [a - b for a, b in zip(steady, steady[1:])]
    assert min(gaps) >= -1e-12 and max(gaps) <= 1.0 / plans[0].total_steps + 1e-12
    assert plans[-1].lr_scale(plans[-1].total_steps) == 0.0 and scales[-1] > 0.0


def test_a_replan_continues_the_schedule_from_where_the_old_plan_had_got():
    first = plan_steps(budget_s=100, elapsed_s=15, steps_done=5, step_s=1.0, eval_s=0.0, epochs=3, pairs_per_step=8)
    assert first.total_steps == 90 and first.lr_scale(30) == pytest.approx(1 - 30 / 90)
    again = plan_steps(budget_s=100, elapsed_s=30, steps_done=30, step_s=0.5, eval_s=0.0, epochs=3, pairs_per_step=8,
                       epochs_done=1, lr_start_step=30, lr_start_scale=first.lr_scale(30))
    # two epochs left, 70 s at 0.5 s per step: 70 steps each, after the 30 taken
    assert again.batches_per_epoch == 70 and again.total_steps == 170
    assert again.lr_scale(30) == pytest.approx(first.lr_scale(30)) and again.lr_scale(170) == 0.0
    assert again.lr_scale(100) == pytest.approx(first.lr_scale(30) * 70 / 140)
    assert again.projected_s == pytest.approx(100.0) and again.fits
    assert StepPlan.from_dict(again.as_dict()) == again
    # a checkpoint written before re-plans existed has no epochs_done / lr fields: it reads as a first plan
    old = {k: v for k, v in first.as_dict().items() if k not in ("epochs_done", "lr_start_step", "lr_start_scale")}
    assert StepPlan.from_dict(old) == first
    with pytest.raises(ValueError, match="epochs_done"):
        plan_steps(budget_s=100, elapsed_s=30, steps_done=30, step_s=0.5, eval_s=0.0, epochs=3, pairs_per_step=8,
                   epochs_done=3)


def test_no_warmup_times_from_the_start():
    clock = FakeClock()
    timer = StepTimer(0, 2, clock)
    timer.start()
    for steps in (1, 2):
        clock.now += 0.5
        done = timer.step_done(steps)
    assert done and timer.step_s == 0.5


def test_epoch_line_says_where_the_run_is():
    line = epoch_line("hardnet 5a1f_00000", {"epoch": 2, "planned_epochs": 3, "step": 640, "planned_steps": 960,
                                             "pairs_per_s": 651.4, "eval_fpr95": 0.22131, "budget_left_s": 95.2})
    assert line == ("[patchflow] hardnet 5a1f_00000: epoch 2/3, step 640/960, 651 pairs/s, eval FPR95 0.2213, "
                    "1m35s of the budget left")
    assert "budget" not in epoch_line("x", {"epoch": 1, "planned_epochs": 1, "step": 5, "eval_fpr95": 0.5})
    # start-up and the minimum first epoch can outlast a short budget (a loaded machine): said as such
    assert epoch_line("x", {"epoch": 1, "planned_epochs": 1, "planned_steps": 13, "step": 13, "pairs_per_s": 54.0,
                            "eval_fpr95": 0.9182, "budget_left_s": -63.1}).endswith("1m03s over the budget")


@dataclass
class FailInEpoch(TrainHooks):
    """Raise once on ``rank`` at the first step of ``epoch`` (its position depends on the plan)."""

    rank: int
    epoch: int
    marker: str

    def after_backward(self, *, rank, epoch, step):
        if rank == self.rank and epoch == self.epoch and not Path(self.marker).exists():
            Path(self.marker).write_text(f"failed at epoch {epoch} step {step}")
            raise RuntimeError(f"injected failure on rank {rank} in epoch {epoch}")


def test_budgeted_ddp_run_agrees_on_every_rank_replans_each_epoch_and_goes_on_after_a_restart(
        ray_cluster, synthetic_shards, tmp_path, tracking_uri):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # FailInEpoch reaches the workers by value
    epochs, warmup, probe = 2, 1, 3
    cfg = small_config(synthetic_shards, tmp_path, tracking_uri, data={"eval_pairs": 256}, run={"max_failures": 1},
                       train={"epochs": epochs, "batch_size": 16, "time_budget_s": 25, "budget_warmup_steps": warmup,
                              "budget_probe_steps": probe})
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(get_or_create_experiment(client, "test")).info.run_id
    reads, marker = tmp_path / "reads", tmp_path / "failed"
    reads.mkdir()
    hooks = HookList([RecordReads(str(reads)), FailInEpoch(rank=1, epoch=1, marker=str(marker))])
    result = build_trainer(cfg, name="budgeted", tracking_uri=tracking_uri, mlflow_run_id=run_id, hooks=hooks).fit()

    # the first plan inside epoch 1; a re-plan at epoch 2's start, made again after the restart in it
    # (from epoch 1's checkpointed plan)
    assert marker.read_text().startswith("failed at epoch 1")
    keys = ("budget_s", "total_steps", "batches_per_epoch", "epochs", "pairs_per_s", "step_s", "eval_s", "elapsed_s",
            "epochs_done", "lr_start_step", "lr_start_scale")
    logged = {k: [m.value for m in client.get_metric_history(run_id, f"plan/{k}")] for k in keys}
    assert logged["epochs_done"] == [0, 1, 1], logged
    first = {k: v[0] for k, v in logged.items()}
    last = {k: v[-1] for k, v in logged.items()}
    assert first["budget_s"] == 25 and first["epochs"] == epochs
    # each plan is the formula's answer for the figures it logged: the first keeps at least the
    # probe's own steps; the re-plan sizes the one epoch left after the first epoch's steps
    fit = math.floor((first["budget_s"] - first["elapsed_s"] - epochs * first["eval_s"]) / first["step_s"] + 1e-9)
    assert first["batches_per_epoch"] == max((warmup + probe + max(0, fit)) // epochs, warmup + probe)
    assert first["total_steps"] == epochs * first["batches_per_epoch"]
    assert first["pairs_per_s"] == pytest.approx(16 * 2 / first["step_s"])
    bpe0 = int(first["batches_per_epoch"])
    fit = math.floor((last["budget_s"] - last["elapsed_s"] - last["eval_s"]) / last["step_s"] + 1e-9)
    assert last["batches_per_epoch"] == max(fit, 1) and last["total_steps"] == bpe0 + last["batches_per_epoch"]
    # the schedule goes on from where the first plan had got: lr x (1 - steps/total) at the re-plan
    assert last["lr_start_step"] == bpe0 and last["lr_start_scale"] == pytest.approx(1 - bpe0 / first["total_steps"])
    bpe1 = int(last["batches_per_epoch"])

    # both ranks trained exactly the plans' batches in each epoch (rank 1's plans are rank 0's)
    for epoch, bpe in enumerate((bpe0, bpe1)):
        counts = [len(json.loads((reads / f"rank{r}-epoch{epoch}.json").read_text())["ids"]) for r in (0, 1)]
        assert counts == [bpe * 16, bpe * 16], (epoch, counts)
    state = load_state(result.checkpoint.path)
    assert state["step"] == last["total_steps"] and StepPlan.from_dict(state["plan"]).total_steps == last["total_steps"]
    assert result.metrics["planned_steps"] == last["total_steps"] and result.metrics["planned_epochs"] == epochs
    # the linear schedule reached its last step: lr = base x scale x (1 / steps from the re-plan to the end)
    assert result.metrics["lr"] == pytest.approx(cfg.train.lr * last["lr_start_scale"] / bpe1)
    assert "budget_left_s" in result.metrics
