"""Example data for every source kind, made from what is installed (nothing is downloaded):
`python -m raybig.data.samples examples/data` writes what the jobs/ examples read.

- docs/*.txt             one document per standard-library module: its docstrings
- docs.jsonl             {"text": ...}, one function's docstring each
- qa.jsonl               {"prompt": "...", "completion": "..."}: what a function does, from its docstring
- chat.jsonl             {"messages": [user, assistant]}: the same, as conversations
- docs.parquet           a text column ("text")
- digits.csv             the 8x8 digits, pixel columns p0..p63 and a label column of names ("zero", ...)
- diabetes.csv           scikit-learn's diabetes table: ten features and a number to predict (regression)
- digits_images/<name>/  the digits as 8x8 greyscale PNGs, one folder per class
- docs_hf/               a datasets DatasetDict (train, validation) saved with save_to_disk
"""
from __future__ import annotations

import ast
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np

MODULES = ("argparse", "textwrap", "difflib", "inspect", "string", "shlex", "fractions", "heapq", "bisect",
           "calendar", "pprint", "dataclasses", "functools", "tokenize", "glob", "fnmatch", "csv", "zipfile",
           "tarfile", "gettext", "locale", "random", "statistics", "base64", "hashlib", "hmac", "queue", "sched")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def docstrings() -> dict[str, list[tuple[str, str]]]:
    """(qualified name, docstring) of every documented function and class, per standard-library module."""
    out = {}
    for module in MODULES:
        path = Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py"
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        found = [(module, ast.get_docstring(tree) or "")]
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 20:
                    found.append((f"{module}.{node.name}", doc))
        out[module] = [(name, doc) for name, doc in found if doc]
    return out


def write_text(root: Path, docs: dict) -> None:
    (root / "docs").mkdir(parents=True, exist_ok=True)
    for module, entries in docs.items():
        (root / "docs" / f"{module}.txt").write_text("\n\n".join(doc for _, doc in entries) + "\n", encoding="utf-8")
    rows = [{"text": doc} for entries in docs.values() for _, doc in entries]
    _jsonl(root / "docs.jsonl", rows)
    qa = [(name, doc.split("\n\n")[0].replace("\n", " ")) for entries in docs.values() for name, doc in entries[1:]]
    _jsonl(root / "qa.jsonl", [{"prompt": f"What does {name} do?\n", "completion": answer} for name, answer in qa])
    _jsonl(root / "chat.jsonl", [{"messages": [{"role": "user", "content": f"What does {name} do?"},
                                               {"role": "assistant", "content": answer}]} for name, answer in qa])


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_tables(root: Path, docs: dict) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    root.mkdir(parents=True, exist_ok=True)
    texts = [doc for entries in docs.values() for _, doc in entries]
    pq.write_table(pa.table({"text": texts, "length": [len(t) for t in texts]}), root / "docs.parquet")
    digits = load_digits()
    columns = {f"p{i}": digits.data[:, i].astype(np.float32) / 16.0 for i in range(64)}
    pacsv.write_csv(pa.table({**columns, "label": [DIGIT_NAMES[t] for t in digits.target]}), root / "digits.csv")
    from sklearn.datasets import load_diabetes

    diabetes = load_diabetes()
    table = {name: diabetes.data[:, i].astype(np.float32) for i, name in enumerate(diabetes.feature_names)}
    # the target scaled to about unit size, so a default learning rate suits it
    pacsv.write_csv(pa.table({**table, "progression": (diabetes.target / 100.0).astype(np.float32)}),
                    root / "diabetes.csv")


def write_images(root: Path, per_class: int | None = None) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = dict.fromkeys(range(10), 0)
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        if per_class is not None and counts[target] >= per_class:
            continue
        counts[target] += 1
        folder = root / "digits_images" / DIGIT_NAMES[target]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * (255 / 16)).astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")


def write_hf_disk(root: Path, docs: dict) -> None:
    import datasets

    datasets.disable_progress_bars()
    texts = [doc for entries in docs.values() for _, doc in entries]
    split = datasets.Dataset.from_dict({"text": texts}).train_test_split(test_size=0.2, seed=0)
    datasets.DatasetDict({"train": split["train"], "validation": split["test"]}).save_to_disk(str(root / "docs_hf"))


def write_all(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    docs = docstrings()
    write_text(root, docs)
    write_tables(root, docs)
    write_images(root)
    write_hf_disk(root, docs)
    return root


if __name__ == "__main__":
    target = write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/data"))
    print(f"wrote example data to {target}/")
