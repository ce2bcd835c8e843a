"""Training sized by a time budget (``train.time_budget_s``, pipeline.budget): durations, the plan on
a fake clock (no timed asserts), and one real 2-rank run whose logged plan is consistent, agreed by
both ranks and kept across a restart."""

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


def test_budgeted_ddp_run_plans_once_agrees_on_every_rank_and_keeps_its_plan(ray_cluster, synthetic_shards, tmp_path,
                                                                             tracking_uri):
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

    # planned once: the restart in epoch 2 restored the plan from epoch 1's checkpoint instead of re-planning
    assert marker.read_text().startswith("failed at epoch 1")
    logged = {k: [m.value for m in client.get_metric_history(run_id, f"plan/{k}")]
              for k in ("budget_s", "total_steps", "batches_per_epoch", "epochs", "pairs_per_s", "step_s", "eval_s",
                        "elapsed_s")}
    assert all(len(v) == 1 for v in logged.values()), logged
    plan = {k: v[0] for k, v in logged.items()}
    assert plan["budget_s"] == 25 and plan["epochs"] == epochs
    # the plan is the formula's answer for the figures it logged (at least the probe's own steps)
    fit = math.floor((plan["budget_s"] - plan["elapsed_s"] - epochs * plan["eval_s"]) / plan["step_s"] + 1e-9)
    assert plan["batches_per_epoch"] == max((warmup + probe + max(0, fit)) // epochs, warmup + probe)
    assert plan["total_steps"] == epochs * plan["batches_per_epoch"]
    assert plan["pairs_per_s"] == pytest.approx(16 * 2 / plan["step_s"])
    bpe = int(plan["batches_per_epoch"])

    # both ranks trained exactly the plan's batches in each epoch (rank 1's plan is rank 0's)
    for epoch in range(epochs):
        counts = [len(json.loads((reads / f"rank{r}-epoch{epoch}.json").read_text())["ids"]) for r in (0, 1)]
        assert counts == [bpe * 16, bpe * 16], (epoch, counts)
    state = load_state(result.checkpoint.path)
    assert state["step"] == plan["total_steps"] and StepPlan.from_dict(state["plan"]).total_steps == plan["total_steps"]
    assert result.metrics["planned_steps"] == plan["total_steps"] and result.metrics["planned_epochs"] == epochs
    # the linear schedule reached its last step: lr = base x (1 - (S-1)/S)
    assert result.metrics["lr"] == pytest.approx(cfg.train.lr / plan["total_steps"])
    assert "budget_left_s" in result.metrics
