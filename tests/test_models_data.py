"""Models, datasets, batch sources and metrics: pure torch and numpy, no Ray."""
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score

from raybig.data.datasets import DIGITS_ROWS, describe, load
from raybig.data.loader import MemorySource
from raybig.models import build_model
from raybig.spec import parse_spec
from raybig.train.metrics import confusion, from_confusion


def spec_for(model, data=None):
    return parse_spec({"name": "x", "model": model, "data": data or {"source": "digits"}})


@pytest.mark.parametrize("model, blocks", [
    ({"kind": "mlp", "hidden": [32, 16]}, 3),
    ({"kind": "cnn", "channels": [8, 16]}, 4),
    ({"kind": "lstm", "layers": 2}, 3),
    ({"kind": "transformer", "layers": 3}, 5),
])
def test_classifiers_are_block_lists_with_class_logits(model, blocks):
    spec = spec_for(model)
    net = build_model(spec.model, describe(spec.data))
    assert len(net.blocks) == blocks
    x = torch.rand(5, 8, 8)
    assert net(x).shape == (5, 10)
    h = x  # the blocks, applied one by one, are the model: what a pipeline split relies on
    for block in net.blocks:
        h = block(h)
    assert torch.equal(h, net(x))


def test_char_lm_predicts_every_next_token():
    spec = spec_for({"kind": "transformer", "task": "lm", "dim": 32, "heads": 2, "layers": 2},
                    {"source": "text", "seq_len": 16, "max_chars": 5000})
    bundle = load(spec.data)
    assert bundle.meta.task == "lm" and len(bundle.meta.vocab) == bundle.meta.num_classes
    assert np.array_equal(bundle.train.x[0, 1:], bundle.train.y[0, :-1])  # targets are the inputs shifted by one
    net = build_model(spec.model, bundle.meta)
    out = net(torch.as_tensor(bundle.train.x[:3]))
    assert out.shape == (3, 16, bundle.meta.num_classes)
    # causal: changing a later token must not change earlier predictions
    x = torch.as_tensor(bundle.train.x[:1]).clone()
    before = net(x)
    x[0, -1] = (x[0, -1] + 1) % bundle.meta.num_classes
    assert torch.allclose(before[0, :-1], net(x)[0, :-1], atol=1e-6)


def test_digits_split_is_stratified_and_fixed():
    spec = spec_for({"kind": "mlp"})
    a, b = load(spec.data), load(spec.data)
    assert len(a.train) + len(a.val) == DIGITS_ROWS
    assert np.array_equal(a.val.y, b.val.y) and np.array_equal(a.train.x, b.train.x)
    assert np.bincount(a.val.y).min() >= 30  # every class is in validation
    assert a.train.x.shape[1:] == (8, 8) and 0 <= a.train.x.min() and a.train.x.max() <= 1


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"a": rng.random(100), "b": rng.random(100), "y": rng.integers(0, 3, 100)}),
                   tmp_path / "d.parquet")
    spec = spec_for({"kind": "mlp"}, {"source": "parquet", "path": str(tmp_path / "d.parquet"), "label": "y"})
    bundle = load(spec.data)
    assert bundle.meta.shape == [2] and bundle.meta.num_classes == 3 and len(bundle.train) + len(bundle.val) == 100


def test_global_batches_do_not_depend_on_the_data_degree():
    x, y = torch.arange(100).float().reshape(100, 1), torch.arange(100)
    single = list(MemorySource(x, y, 20, 0, 1, seed=3).train_batches(epoch=2))
    ranks = [list(MemorySource(x, y, 20, r, 2, seed=3).train_batches(epoch=2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == 5
    for step, (sx, sy) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), sy)
    other_epoch = list(MemorySource(x, y, 20, 0, 1, seed=3).train_batches(epoch=3))
    assert not torch.equal(other_epoch[0][1], single[0][1])  # reshuffled every epoch


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    p[:150] = y[:150]
    m = from_confusion(confusion(torch.as_tensor(p), torch.as_tensor(y), 5))
    assert m["accuracy"] == pytest.approx((p == y).mean())
    assert m["precision"] == pytest.approx(precision_score(y, p, average="macro"))
    assert m["recall"] == pytest.approx(recall_score(y, p, average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, p, average="macro"))
