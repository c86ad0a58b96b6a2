"""The model store on disk: atomic checkpoints, retention, safe loading, resume in-process."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from raybig.train.checkpoint import RunStore
from test_optim import train_locally


def test_checkpoints_keep_the_newest_and_publish_the_model(tmp_path):
    history, store = train_locally(tmp_path, epochs=4, optimizer={"name": "adam", "lr": 2e-3})
    assert [p.name for p in store.checkpoint_dirs()] == ["epoch-0003", "epoch-0004"]  # keep: 2
    info = json.loads((store.root / "model.json").read_text())
    assert info["epoch"] == 4 and info["data"]["num_classes"] == 10
    assert [r["epoch"] for r in store.history()] == [1, 2, 3, 4]
    published = load_file(store.root / "model.safetensors")
    last = load_file(store.latest() / "model.safetensors")
    assert published.keys() == last.keys() and all(torch.equal(published[k], last[k]) for k in published)


def test_a_sweep_trials_store_is_pruned_only_up_to_the_epoch_tune_has_copied(tmp_path):
    _, store = train_locally(tmp_path, epochs=4, prune_checkpoints=False, optimizer={"name": "adam", "lr": 2e-3})
    names = lambda: [p.name for p in store.checkpoint_dirs()]  # noqa: E731
    assert names() == ["epoch-0001", "epoch-0002", "epoch-0003", "epoch-0004"]
    store.prune(2, through_epoch=2)  # Tune has copied epochs 1-2 only: those are the 2 to keep so far
    assert names() == ["epoch-0001", "epoch-0002", "epoch-0003", "epoch-0004"]
    store.prune(2, through_epoch=3)
    assert names() == ["epoch-0002", "epoch-0003", "epoch-0004"]
    store.prune(2, through_epoch=4)
    assert names() == ["epoch-0003", "epoch-0004"]


def test_a_half_written_checkpoint_is_never_picked(tmp_path):
    _, store = train_locally(tmp_path, epochs=2, optimizer={"name": "adam", "lr": 2e-3})
    (store.checkpoints / ".tmp-epoch-0003-deadbeef").mkdir()  # what a crash mid-write leaves behind
    assert store.latest().name == "epoch-0002"


def test_trainer_state_loads_without_unpickling_objects(tmp_path):
    _, store = train_locally(tmp_path, epochs=1, optimizer={"name": "adam", "lr": 2e-3})
    checkpoint = store.latest()
    malicious = checkpoint / "part-0-trainer.pt"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"optimizer": Evil()}, malicious)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        RunStore.load_checkpoint(checkpoint)  # (its manifest no longer matches either: latest() passes it over)
    assert RunStore(store.root).latest() is None


def test_a_rerun_continues_after_the_last_checkpoint(tmp_path):
    first, store = train_locally(tmp_path, epochs=2, optimizer={"name": "adam", "lr": 2e-3})
    more, _ = train_locally(tmp_path, epochs=4, optimizer={"name": "adam", "lr": 2e-3})
    assert [r["epoch"] for r in more] == [1, 2, 3, 4]
    assert more[:2] == first  # the first two epochs were loaded, not retrained
    straight, _ = train_locally(tmp_path / "straight", epochs=4, optimizer={"name": "adam", "lr": 2e-3})
    assert more[-1]["train_loss"] == pytest.approx(straight[-1]["train_loss"], rel=1e-5)


def test_a_restart_shows_the_workers_error_text_as_it_is_even_with_brackets():
    """A worker's error (gloo's "[.../pair.cc:537] Connection closed by peer") is text, not console markup."""
    import io

    from rich.console import Console

    from raybig.spec import parse_spec
    from raybig.train.progress import ProgressView

    out = io.StringIO()
    spec = parse_spec({"name": "r", "model": {"kind": "mlp"}, "data": {"source": "digits"},
                       "failure": {"max_failures": 2}})
    reason = "[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Connection closed by peer [1]"
    with ProgressView(spec, Console(file=out, width=300)) as view:
        view.handle({"type": "restart", "failures": 1, "reason": reason})
    assert f"a worker failed ({reason})" in out.getvalue() and "failure 1 of 2" in out.getvalue()


def test_a_damaged_latest_checkpoint_is_named_and_the_run_resumes_from_the_previous_good_one(tmp_path):
    """Cutting the newest checkpoint's weights in half stopped the rerun for good (SafetensorError)."""
    import io

    from rich.console import Console

    from raybig.train.progress import ProgressView

    first, store = train_locally(tmp_path, epochs=4, optimizer={"name": "adam", "lr": 2e-3})
    weights = store.checkpoint_dir(4) / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    store = RunStore(store.root)
    assert store.latest().name == "epoch-0003"
    assert store.damaged() == [f"checkpoints/epoch-0004 cannot be used: model.safetensors has {size // 2} bytes "
                               f"where its manifest says {size} (cut short or overwritten)"]
    out = io.StringIO()
    with ProgressView(_spec(), Console(file=out, width=300), resumed_at=(3, 66), damaged=store.damaged()):
        pass
    assert "epoch-0004 cannot be used: model.safetensors has" in out.getvalue() and "step 66" in out.getvalue()

    more, store = train_locally(tmp_path, epochs=5, optimizer={"name": "adam", "lr": 2e-3})
    assert [r["epoch"] for r in more] == [1, 2, 3, 4, 5] and more[:3] == first[:3]  # epoch 4 again, from 3
    assert store.damaged() == [] and [p.name for p in store.checkpoint_dirs()] == ["epoch-0004", "epoch-0005"]
    straight, _ = train_locally(tmp_path / "straight", epochs=5, optimizer={"name": "adam", "lr": 2e-3})
    assert more[-1]["train_loss"] == pytest.approx(straight[-1]["train_loss"], rel=1e-5)


def _spec():
    from raybig.spec import parse_spec

    return parse_spec({"name": "r", "model": {"kind": "mlp"}, "data": {"source": "digits"}})


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    _, store = train_locally(tmp_path_factory.mktemp("damage"), epochs=2, optimizer={"name": "adam", "lr": 2e-3})
    return store.root


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, says", [
    (lambda c: _flip_a_byte(c / "part-0-trainer.pt"), "part-0-trainer.pt does not match its manifest's checksum"),
    (lambda c: (c / "model.json").unlink(), "model.json is missing"),
    (lambda c: _flip_a_byte(c / "meta.json"), "meta.json does not match its manifest's checksum"),
    (lambda c: (c / "manifest.json").write_text('{"model.safe'), "its manifest.json is not readable JSON"),
])
def test_every_kind_of_damage_is_named_by_its_file(two_checkpoints, tmp_path, damage, says):
    root = tmp_path / "run"
    shutil.copytree(two_checkpoints, root)
    store = RunStore(root)
    assert store.latest().name == "epoch-0002" and store.damaged() == []
    damage(store.checkpoint_dir(2))
    store = RunStore(root)
    assert store.latest().name == "epoch-0001"
    (line,) = store.damaged()
    assert line.startswith("checkpoints/epoch-0002 cannot be used: ") and says in line, line


def test_a_checkpoint_written_before_manifests_is_taken_as_it_is(two_checkpoints, tmp_path):
    shutil.copytree(two_checkpoints, tmp_path / "run")
    store = RunStore(tmp_path / "run")
    (store.checkpoint_dir(2) / "manifest.json").unlink()
    assert store.latest().name == "epoch-0002" and store.damaged() == []


def test_a_rerun_is_suggested_only_where_it_can_get_past_the_error():
    import ray

    from raybig.train.runner import rerun_helps

    as_raised_by_ray = ray.exceptions.RayTaskError("run", "Traceback ...", ValueError("bad row")).as_instanceof_cause()
    assert not rerun_helps(as_raised_by_ray) and not rerun_helps(FloatingPointError("the run diverged"))
    assert rerun_helps(ray.exceptions.RayActorError()) and rerun_helps(RuntimeError("Connection closed by peer"))
