"""Every optimizer, regularizer, schedule and precision of the spec, exercised through the one training
loop in-process (world size 1, no Ray): the same code path each Ray Train worker runs."""
import pytest
import torch

from raybig.data.datasets import load
from raybig.data.loader import MemorySource
from raybig.spec import OPTIMIZERS, parse_spec
from raybig.train.checkpoint import RunStore
from raybig.train.loop import WorkerEnv, fit
from raybig.train.optim import build_scheduler, penalized_weights


def train_locally(tmp_path, prune_checkpoints=True, **train):
    """The one training loop in this process (world size 1, no Ray): a small digits MLP, stored in tmp_path/run."""
    raw = {"name": "x", "model": {"kind": "mlp", "hidden": [64]}, "data": {"source": "digits"},
           "train": {"epochs": 3, "batch_size": 64, "seed": 0, **train}}
    spec = parse_spec(raw)
    bundle = load(spec.data)
    env = WorkerEnv(0, 1, torch.device("cpu"), MemorySource(bundle.train.x, bundle.train.y, 64, 0, 1, 0),
                    MemorySource(bundle.val.x, bundle.val.y, 64, 0, 1, 0), prune_checkpoints=prune_checkpoints)
    store = RunStore(tmp_path / "run")
    history = fit(spec, bundle.meta, env, store)
    store.write_spec(spec.to_yaml())
    return history, store


def weight_norms(store):
    state = store.load_model_state()
    return {"l1": sum(v.abs().sum().item() for k, v in state.items() if v.dim() > 1),
            "l2": sum(v.pow(2).sum().item() for k, v in state.items() if v.dim() > 1)}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains(tmp_path, name):
    lr = {"sgd": 0.5, "momentum": 0.05, "adagrad": 0.05, "rmsprop": 1e-3, "adam": 2e-3, "adamw": 2e-3}[name]
    history, _ = train_locally(tmp_path, optimizer={"name": name, "lr": lr})
    assert history[-1]["train_loss"] < 0.6 * history[0]["step_losses"][0]
    assert history[-1]["val_accuracy"] > 0.8


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_l1_and_l2_shrink_the_weights(tmp_path, kind):
    _, plain = train_locally(tmp_path / "plain", optimizer={"name": "adam", "lr": 2e-3})
    coeff = {"l1": 1e-3, "l2": 1e-2}[kind]
    _, reg = train_locally(tmp_path / kind, optimizer={"name": "adam", "lr": 2e-3}, regularization={kind: coeff})
    assert weight_norms(reg)[kind] < 0.8 * weight_norms(plain)[kind]


def test_dropout_is_active_in_training_only(tmp_path):
    spec = parse_spec({"name": "x", "model": {"kind": "mlp", "hidden": [64]}, "data": {"source": "digits"}})
    from raybig.data.datasets import describe
    from raybig.models import build_model

    net = build_model(spec.model, describe(spec.data), dropout=0.5, seed=0)
    x = torch.rand(4, 8, 8)
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))
    history, _ = train_locally(tmp_path, optimizer={"name": "adam", "lr": 2e-3}, regularization={"dropout": 0.3})
    assert history[-1]["val_accuracy"] > 0.8


def test_lr_schedules():
    params = [torch.nn.Parameter(torch.zeros(1))]
    spec = parse_spec({"name": "x", "model": {"kind": "mlp"}, "data": {"source": "digits"},
                       "train": {"lr_schedule": {"name": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1}}})
    opt = torch.optim.SGD(params, lr=1.0)
    sched = build_scheduler(opt, spec.train.lr_schedule, steps_per_epoch=10, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up
    assert lrs[-1] == pytest.approx(0.1, abs=0.01) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    step = parse_spec({"name": "x", "model": {"kind": "mlp"}, "data": {"source": "digits"},
                       "train": {"lr_schedule": {"name": "step", "step_epochs": 2, "gamma": 0.5}}}).train.lr_schedule
    opt = torch.optim.SGD(params, lr=1.0)
    sched = build_scheduler(opt, step, steps_per_epoch=5, total_steps=30)
    for _ in range(10):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.5)


def test_bf16_and_mse(tmp_path):
    history, _ = train_locally(tmp_path / "bf16", optimizer={"name": "adam", "lr": 2e-3}, precision="bf16")
    assert history[-1]["val_accuracy"] > 0.8
    raw = {"name": "x", "model": {"kind": "mlp", "hidden": [64]}, "data": {"source": "digits", "one_hot": True},
           "train": {"epochs": 3, "loss": "mse", "optimizer": {"name": "adam", "lr": 2e-3}}}
    spec = parse_spec(raw)
    bundle = load(spec.data)
    env = WorkerEnv(0, 1, torch.device("cpu"), MemorySource(bundle.train.x, bundle.train.y, 64, 0, 1, 0),
                    MemorySource(bundle.val.x, bundle.val.y, 64, 0, 1, 0))
    assert fit(spec, bundle.meta, env, RunStore(tmp_path / "mse"))[-1]["val_accuracy"] > 0.8


def test_penalty_skips_biases_and_positions():
    spec = parse_spec({"name": "x", "model": {"kind": "transformer"}, "data": {"source": "digits"}})
    from raybig.data.datasets import describe
    from raybig.models import build_model

    net = build_model(spec.model, describe(spec.data))
    penalized = {id(p) for p in penalized_weights(net)}
    for name, p in net.named_parameters():
        assert (id(p) in penalized) == (p.dim() > 1 and not name.endswith("pos")), name


def test_a_diverging_run_stops_with_a_clear_reason(tmp_path):
    with pytest.raises(FloatingPointError, match="diverged"):
        train_locally(tmp_path, optimizer={"name": "sgd", "lr": 1.0e20})  # the loss overflows to NaN


def test_a_loss_that_explodes_but_stays_finite_is_divergence_too(tmp_path):
    # sgd at lr 1e4 sends the loss to ~1e12 in the first epoch, then kills the ReLUs: finite, and useless
    with pytest.raises(FloatingPointError, match=r"rose to .*divergence_factor 100 x"):
        train_locally(tmp_path / "a", epochs=1, optimizer={"name": "sgd", "lr": 1.0e4})
    history, _ = train_locally(tmp_path / "b", epochs=1, optimizer={"name": "sgd", "lr": 1.0e4},
                               divergence_factor=None)  # the check can be turned off
    assert history[0]["train_loss"] > 100 * history[0]["step_losses"][0]


def stepped(tmp_path, name, stop_after=None, **train):
    """The digits MLP by steps (22 batches an epoch): records every 10 steps, checkpoints every 8, dropout
    on (its masks must be drawn again the same after a resume). `stop_after`: stop at the first step past it."""
    import threading

    raw = {"name": name, "model": {"kind": "mlp", "hidden": [64]}, "data": {"source": "digits"},
           "train": {"batch_size": 64, "seed": 0, "max_steps": 40, "regularization": {"dropout": 0.2},
                     "lr_schedule": {"name": "cosine", "warmup_steps": 5}, **train},
           "eval": {"every_steps": 10, "max_batches": 2}, "checkpoint": {"every_steps": 8, "keep": 2}}
    spec = parse_spec(raw)
    bundle = load(spec.data)
    stop = threading.Event()

    def progress(item):
        if stop_after is not None and item["type"] == "step" and item["global_step"] > stop_after:
            stop.set()

    env = WorkerEnv(0, 1, torch.device("cpu"), MemorySource(bundle.train.x, bundle.train.y, 64, 0, 1, 0),
                    MemorySource(bundle.val.x, bundle.val.y, 64, 0, 1, 0), progress=progress, stop=stop,
                    attempt=f"{name}, {'stopping' if stop_after else 'to the end'}")
    store = RunStore(tmp_path / name)
    return fit(spec, bundle.meta, env, store), store


def test_max_steps_counts_steps_across_epochs_and_a_stopped_run_resumes_at_the_next_batch(tmp_path):
    straight, store = stepped(tmp_path, "straight")
    assert [r["step"] for r in straight] == [10, 20, 30, 40] and [r["epoch"] for r in straight] == [1, 1, 2, 2]
    assert [len(r["step_losses"]) for r in straight] == [10, 10, 10, 10]
    assert straight[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # the cosine ends at max_steps, not at an epoch
    assert [p.name for p in store.checkpoint_dirs()] == ["epoch-0001+0000010", "epoch-0001+0000018"]
    # stopped after step 21 (the progress item of step 21 asks it to): the newest checkpoint is step 16,
    # with steps 11 to 16 trained but not yet recorded; the resumed run trains from step 17 on
    stopped, store = stepped(tmp_path, "stopped", stop_after=20)
    assert [r["step"] for r in stopped] == [10, 20]
    assert store.latest().name == "epoch-0000+0000016"
    resumed, _ = stepped(tmp_path, "stopped")
    assert [r["step"] for r in resumed] == [10, 20, 30, 40] and len({r["attempt"] for r in resumed}) == 2
    for a, b in zip(resumed, straight):
        assert a["step_losses"] == b["step_losses"]  # exactly: the same batches, masks and weights
        assert a["val_loss"] == b["val_loss"]
    # raising max_steps continues the finished run
    more, _ = stepped(tmp_path, "straight", max_steps=50)
    assert [r["step"] for r in more] == [10, 20, 30, 40, 50]
