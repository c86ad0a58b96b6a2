"""Sweep specs without Ray: the space is checked against the job-spec schema before anything starts."""
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import spec_dict
from raybig.cli import app
from raybig.errors import SpecError
from raybig.spec import parse_spec
from raybig.sweep.space import apply_config, base_of, clip_to_space, trial_spec, tune_space

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def sweep_spec(tmp_path, space, **sweep):
    return spec_dict(tmp_path, sweep={"space": space, **sweep})


def problems_of(raw) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    return err.value.problems


def test_the_shipped_sweep_is_valid_and_covers_the_optimizers_and_regularizers():
    raw = yaml.safe_load((JOBS / "digits_sweep.yaml").read_text())
    spec = parse_spec(raw)
    space = spec.sweep.space
    assert set(space["train.optimizer.name"].choice) == {"sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw"}
    assert {"train.optimizer.lr", "train.regularization.l2", "train.regularization.dropout"} <= set(space)
    assert spec.sweep.scheduler.name == "asha" and spec.sweep.num_trials >= 8


@pytest.mark.parametrize("space, path, says", [
    ({"train.optimzer.lr": {"uniform": [0.1, 0.2]}}, "sweep.space.train.optimzer.lr", "not a field of the job spec"),
    ({"train.regularization.dropout": {"uniform": [0.0, 1.5]}}, "sweep.space.train.regularization.dropout",
     "less than 1"),
    ({"train.optimizer.lr": {"loguniform": [0.0, 0.1]}}, "sweep.space.train.optimizer.lr.loguniform.0", "greater than 0"),
    ({"train.optimizer.lr": {"uniform": [0.1, 0.01]}}, "sweep.space.train.optimizer.lr", "below high"),
    ({"train.batch_size": {"choice": [64, 0]}}, "sweep.space.train.batch_size", "greater than or equal to 1"),
    ({"train.optimizer.momentum": {"uniform": [0.5, 0.9]}}, "sweep.space.train.optimizer.momentum",
     "no optimizer in this sweep (adam) takes momentum"),
    ({"name": {"choice": ["a", "b"]}}, "sweep.space.name", "set by the sweep itself"),
    ({"train.optimizer.lr": {"uniform": [0.1, 0.2], "choice": [0.1]}}, "sweep.space.train.optimizer.lr",
     "exactly one of"),
    ({"model.channels": {"choice": [[8, 16]]}}, "sweep.space.model.channels", "not a field"),  # an mlp has none
])
def test_a_bad_axis_is_named_with_what_was_expected(tmp_path, space, path, says):
    found = problems_of(sweep_spec(tmp_path, space))
    assert any(p == path and says in m for p, m in found), found


@pytest.mark.parametrize("sweep, path, says", [
    ({"searcher": "grid", "space": {"train.optimizer.lr": {"uniform": [0.001, 0.1]}}}, "sweep.searcher", "range"),
    ({"searcher": "grid", "trials": 4, "space": {"train.optimizer.lr": {"grid": [0.001, 0.1]}}}, "sweep.trials",
     "every combination"),
    ({"searcher": "optuna", "space": {"train.optimizer.lr": {"grid": [0.001, 0.1]}}}, "sweep.searcher", "grid"),
    ({"searcher": "optuna", "scheduler": "pbt", "space": {"train.optimizer.lr": {"uniform": [0.001, 0.1]}}},
     "sweep.scheduler", "random searcher"),
    ({"scheduler": "pbt", "space": {"train.batch_size": {"choice": [32, 64]}}}, "sweep.scheduler", "perturbs"),
    ({"scheduler": "hyperband", "space": {"train.batch_size": {"choice": [32, 64]}}}, "sweep.scheduler.name",
     "fifo, asha, pbt"),
    ({"metric": "accuracy", "space": {"train.batch_size": {"choice": [32, 64]}}}, "sweep.metric", "val_accuracy"),
])
def test_searcher_and_scheduler_needs_are_checked(tmp_path, sweep, path, says):
    found = problems_of(spec_dict(tmp_path, sweep=sweep))
    assert any(p == path and says in m for p, m in found), found


def test_cli_rejects_a_bad_sweep_before_anything_starts(tmp_path):
    raw = sweep_spec(tmp_path, {"train.optimizer.lr": {"uniform": [0.0, 0.1]}, "train.nope": {"choice": [1]}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert result.exit_code == 2
    assert "sweep.space.train.optimizer.lr: 0.0" in result.output and "sweep.space.train.nope" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_sweep_needs_a_sweep_section():
    result = CliRunner().invoke(app, ["sweep", str(JOBS / "digits_mlp.yaml")])
    assert result.exit_code == 2 and "sweep: the spec has no sweep section" in result.output


def test_a_sampled_optimizer_keeps_only_the_fields_it_takes(tmp_path):
    raw = spec_dict(tmp_path, train={"optimizer": {"name": "adam", "lr": 0.01, "betas": [0.8, 0.9]}},
                    sweep={"space": {"train.optimizer.name": {"choice": ["adam", "momentum"]},
                                     "train.optimizer.momentum": {"uniform": [0.5, 0.95]}}})
    base = base_of(parse_spec(raw))
    assert "sweep" not in base and "betas" in base["train"]["optimizer"]
    momentum = trial_spec(base, {"train.optimizer.name": "momentum", "train.optimizer.momentum": 0.7}, "t-1", "/o")
    assert momentum.train.optimizer.name == "momentum" and momentum.train.optimizer.momentum == 0.7
    assert momentum.train.optimizer.lr == 0.01 and momentum.name == "t-1" and momentum.output.dir == "/o"
    adam = trial_spec(base, {"train.optimizer.name": "adam", "train.optimizer.momentum": 0.7}, "t-2", "/o")
    assert adam.train.optimizer.name == "adam" and tuple(adam.train.optimizer.betas) == (0.8, 0.9)
    # fields the user left unset take the sampled optimizer's own defaults
    sgd = parse_spec(apply_config(base_of(parse_spec(spec_dict(tmp_path))), {"train.optimizer.name": "sgd"}))
    assert sgd.train.optimizer.lr == 2e-3  # the base's lr is kept, it was set


def test_pbt_perturbations_are_kept_inside_their_ranges(tmp_path):
    spec = parse_spec(sweep_spec(tmp_path, {"train.regularization.dropout": {"uniform": [0.0, 0.5]},
                                            "train.optimizer.lr": {"loguniform": [1e-4, 1e-1]},
                                            "train.batch_size": {"randint": [16, 65]}}))
    clipped = clip_to_space({"train.regularization.dropout": 0.6, "train.optimizer.lr": 5e-5,
                             "train.batch_size": 80.4}, spec.sweep.space)
    assert clipped == {"train.regularization.dropout": 0.5, "train.optimizer.lr": 1e-4, "train.batch_size": 64}


def test_tune_space_kinds(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    spec = parse_spec(sweep_spec(tmp_path, {"train.optimizer.lr": {"loguniform": [1e-4, 1e-1]},
                                            "train.batch_size": {"choice": [32, 64]},
                                            "train.seed": {"randint": [0, 10]},
                                            "train.regularization.l2": {"grid": [0.0, 1e-4]}}))
    space = tune_space(spec.sweep)
    assert isinstance(space["train.optimizer.lr"], Float) and isinstance(space["train.batch_size"], Categorical)
    assert isinstance(space["train.seed"], Integer) and space["train.regularization.l2"] == {"grid_search": [0.0, 1e-4]}
    grid = parse_spec(sweep_spec(tmp_path, {"train.batch_size": {"choice": [32, 64]}}, searcher="grid"))
    assert tune_space(grid.sweep)["train.batch_size"] == {"grid_search": [32, 64]}


def test_a_loaded_optimizer_state_takes_the_specs_hyperparameters():
    """What lets a PBT trial continue its donor's checkpoint with a perturbed lr and weight decay."""
    from raybig.spec import AdamW, LRSchedule
    from raybig.train.optim import apply_spec_hyperparameters, build_optimizer, build_scheduler

    w = torch.nn.Parameter(torch.ones(3))
    donor = build_optimizer([w], AdamW(name="adamw", lr=1e-3, weight_decay=0.1))
    donor_sched = build_scheduler(donor, LRSchedule(name="step", step_epochs=1, gamma=0.5), 10, 40)
    for _ in range(12):
        w.grad = torch.ones(3)
        donor.step()
        donor_sched.step()
    state, sched_state = donor.state_dict(), donor_sched.state_dict()

    w2 = torch.nn.Parameter(torch.ones(3))
    mine = build_optimizer([w2], AdamW(name="adamw", lr=4e-3, weight_decay=0.02))
    sched = build_scheduler(mine, LRSchedule(name="step", step_epochs=1, gamma=0.5), 10, 40)
    mine.load_state_dict(state)
    sched.load_state_dict(sched_state)
    assert mine.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5)  # what torch restores: the donor's
    apply_spec_hyperparameters(mine, sched, AdamW(name="adamw", lr=4e-3, weight_decay=0.02))
    group = mine.param_groups[0]
    assert group["lr"] == pytest.approx(4e-3 * 0.5) and group["weight_decay"] == 0.02  # the schedule's place kept
    assert mine.state[w2]["step"] == 12  # the moments are the donor's
    sched.step()
    assert mine.param_groups[0]["lr"] == pytest.approx(4e-3 * 0.5)


def test_a_sampled_field_of_the_default_optimizer_lands_on_that_optimizer(tmp_path):
    raw = spec_dict(tmp_path, sweep={"space": {"train.optimizer.lr": {"loguniform": [1e-4, 1e-1]}}})
    raw["train"] = {"epochs": 2}  # the optimizer left at its default (adamw)
    spec = parse_spec(raw)
    trial = trial_spec(base_of(spec), {"train.optimizer.lr": 0.02}, "t-1", str(tmp_path))
    assert trial.train.optimizer.name == spec.train.optimizer.name == "adamw"
    assert trial.train.optimizer.lr == 0.02


def test_axes_valid_alone_but_not_together_are_refused_up_front(tmp_path):
    raw = spec_dict(tmp_path, sweep={"space": {"train.batch_size": {"choice": [64, 63]},
                                               "parallelism.data": {"choice": [1, 2]}}})
    (problem,) = problems_of(raw)
    assert problem[0] == "sweep.space"
    assert "train.batch_size=63 with parallelism.data=2" in problem[1] and "divisible" in problem[1]


def test_every_probe_combination_of_an_accepted_space_gives_a_valid_trial(tmp_path):
    import itertools

    spec = parse_spec(yaml.safe_load((JOBS / "digits_sweep.yaml").read_text()))
    space = spec.sweep.space
    for values in itertools.product(*(dim.probes() for dim in space.values())):
        trial_spec(base_of(spec), dict(zip(space, values)), "t-1", str(tmp_path))  # raises if one is invalid
