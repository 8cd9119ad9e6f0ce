"""Bad input fails in seconds, before any process group, engine or model is built, with exit 2 and a
message naming the field or file: the ds_config (truncated JSON, a typo or an unknown method in its
"ds_soo" block) and the data (an image .npz with the wrong keys, not a zip, truncated; an empty text).
Also the npz image source itself: arrays load directly, in either channel layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ds_soo.train import main
from ds_soo.trainer import engine as engine_mod

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
DS_JSON = ROOT / "tests" / "infra" / "ds_trainer.json"


@pytest.fixture
def no_setup(monkeypatch):
    """Fail loudly if anything gets as far as joining a process group or building a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a process group / engine was started before the input was validated")

    for cls in engine_mod.ENGINES.values():
        monkeypatch.setattr(cls, "init_process", classmethod(refuse))
    monkeypatch.setattr("ds_soo.trainer.loop.build_model", refuse)


def _last_error(out: Path) -> str:
    return next(line for line in reversed((out / "train.log").read_text().splitlines()) if "ERROR" in line)


def _ds_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "ds.json"
    p.write_text(text)
    return p


def _ds_with_block(block: dict) -> str:
    ds = json.loads(DS_JSON.read_text())
    ds["ds_soo"] = block
    return json.dumps(ds)


DS_CASES = {
    "truncated JSON": (lambda: DS_JSON.read_text()[:-12], "ds.json"),
    "typo in the ds_soo block": (
        lambda: _ds_with_block({"method": "kfac", "dampin": {"value": 0.01}}),
        "ds_soo.dampin",
    ),
    "unknown method": (lambda: _ds_with_block({"method": "shampo"}), "shampo"),
}


@pytest.mark.parametrize("case", sorted(DS_CASES))
def test_ds_config_errors_before_any_setup(tmp_path, no_setup, case):
    make, named = DS_CASES[case]
    ds = _ds_file(tmp_path, make())
    out = tmp_path / "run"
    rc = main(["--config", str(TINY), "--out", str(out), "--quiet", "--deepspeed_config", str(ds)])
    assert rc == 2
    assert named in _last_error(out)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _images(n: int, layout: str = "nhwc") -> np.ndarray:
    x = np.random.default_rng(0).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    return x if layout == "nhwc" else np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _bad_npz(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / "images.npz"
    if kind == "wrong keys":
        return _npz(p, x=_images(40), y=np.arange(40) % 4)
    if kind == "not a zip":
        p.write_bytes(b"these are not the arrays you are looking for" * 10)
        return p
    good = _npz(p, train_images=_images(200), train_labels=np.arange(200) % 4)
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated
    return good


@pytest.mark.parametrize("kind", ["wrong keys", "not a zip", "truncated"])
def test_bad_image_npz_exits_2_naming_the_file(tmp_path, no_setup, kind):
    f = _bad_npz(tmp_path, kind)
    out = tmp_path / "run"
    assert main(["--config", str(TINY), "--out", str(out), "--quiet", "data.source=npz", f"data.file={f}"]) == 2
    error = _last_error(out)
    assert str(f) in error and "Traceback" not in (out / "train.log").read_text()
    if kind == "wrong keys":
        assert "train_images" in error and "'x'" in error


@pytest.mark.parametrize("kind", ["wrong keys", "not a zip", "truncated"])
def test_bad_cifar10_file_exits_2_naming_the_file(tmp_path, no_setup, kind):
    d = tmp_path / "data"
    d.mkdir()
    f = _bad_npz(d, kind).rename(d / "cifar10_jpeg_q75.npz")
    out = tmp_path / "run"
    rc = main(["--config", str(TINY), "--out", str(out), "--quiet", "data.source=cifar10", f"data.path={d}",
               "data.train_size=64", "data.eval_size=16"])  # fmt: skip
    assert rc == 2 and str(f) in _last_error(out)


def test_empty_text_file_exits_2_naming_it(tmp_path, no_setup):
    f = tmp_path / "empty.txt"
    f.write_text("")
    out = tmp_path / "run"
    rc = main(["--config", str(TINY), "--out", str(out), "--quiet", "data.source=text_file", f"data.file={f}",
               "model.kind=gpt"])  # fmt: skip
    assert rc == 2
    assert str(f) in _last_error(out) and "empty" in _last_error(out)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_npz_source_trains_without_decoding(tmp_path, layout, capfd):
    x, y = _images(240, layout), np.arange(240) % 4
    f = _npz(tmp_path / "arrays.npz", train_images=x[:200], train_labels=y[:200], test_images=x[200:],
             test_labels=y[200:])  # fmt: skip
    out = tmp_path / "run"
    rc = main(["--config", str(TINY), "--out", str(out), "--quiet", "data.source=npz", f"data.file={f}",
               "train.steps=2", "train.batch_size=32"])  # fmt: skip
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"] == {"name": "npz", "num_train": 200, "steps_per_epoch": 6}
    assert "Downloading" not in capfd.readouterr().err + (out / "train.log").read_text()


def test_npz_layouts_give_the_same_images(tmp_path):
    from ds_soo.data.npz import load_npz

    y = np.arange(30) % 3
    a = load_npz(_npz(tmp_path / "a.npz", train_images=_images(30, "nhwc"), train_labels=y), 0.2, 0)
    b = load_npz(_npz(tmp_path / "b.npz", train_images=_images(30, "nchw"), train_labels=y), 0.2, 0)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.shape[1:] == (8, 8, 3) and np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert len(a[0][1]) + len(a[1][1]) == 30 and len(a[1][1]) == 6


def test_cifar10_decodes_once_into_an_arrays_npz(tmp_path, require_data):
    """The shared JPEG file converted once equals what the JPEG loader decodes (first images checked)."""
    from ds_soo.data import cifar10
    from ds_soo.data.npz import cifar10_to_npz, load_npz

    src = Path(os.environ["DS_SOO_DATA"]) / cifar10.FILE
    dst = cifar10_to_npz(src, tmp_path / "cifar10_arrays.npz")
    (xtr, ytr), (xte, yte) = load_npz(dst, 0.2, 0)
    assert xtr.shape == (50000, 32, 32, 3) and xte.shape == (10000, 32, 32, 3)
    with np.load(src) as d:
        labels, buf, offsets = d["test_labels"], d["test_jpeg"], d["test_offsets"]
        assert np.array_equal(yte, labels)
        assert np.array_equal(xte[:5], cifar10._decode(buf, offsets, np.arange(5)))


def test_ds_config_typo_fails_within_seconds(tmp_path):
    """The real CLI, no mocks: exit 2 naming the field long before DeepSpeed would have initialised."""
    ds = _ds_file(tmp_path, _ds_with_block({"method": "kfac", "dampin": {"value": 0.01}}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ds_soo.train", "--config", str(TINY), "--deepspeed_config",
                           str(ds), "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ds_soo.dampin" in proc.stderr and str(ds) in proc.stderr and "Traceback" not in proc.stderr
    print(f"[validate-first] ds_config typo rejected in {took:.1f} s")
    assert took < 30, f"{took:.1f} s"
