"""``python -m ds_soo.experiments``: every smoke preset end to end (real runs, real numbers), the
grid/resume machinery, and the analysis helpers against independent computations."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

from ds_soo.config import ConfigError
from ds_soo.experiments import EXPERIMENTS
from ds_soo.experiments.base import Record
from ds_soo.experiments.cli import main, run_experiment
from ds_soo.experiments.curvature_quality import _interp, _log_spread
from ds_soo.experiments.damping import fit_power_law
from ds_soo.experiments.metrics import mean_step_time, steps_to_target, summarise
from ds_soo.experiments.runner import make_pool

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict[str, Path]:
    """All five smoke presets, two runs at a time through one worker pool (one torch import per worker)."""
    data = Path(os.environ["DS_SOO_DATA"])
    if not (data / "cifar10_jpeg_q75.npz").is_file() or not (data / "tinyshakespeare.txt").is_file():
        pytest.skip(f"CIFAR-10 / Tiny Shakespeare not found under {data}")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    root = tmp_path_factory.mktemp("experiments")
    outs, codes, seconds = {}, {}, {}
    with make_pool(2) as pool:
        for name in EXPERIMENTS:
            t0 = time.perf_counter()
            outs[name] = root / name
            codes[name] = run_experiment(name, "smoke", outs[name], jobs=2, pool=pool)
            seconds[name] = time.perf_counter() - t0
    print("smoke seconds:", {k: round(v, 1) for k, v in seconds.items()})
    assert codes == dict.fromkeys(EXPERIMENTS, 0), codes
    return outs


def _finite_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_smoke_preset_writes_real_results(smoke, name):
    out = smoke[name]
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == name and results["preset"] == "smoke"
    runs = results["runs"]
    assert len(runs) >= 4
    for run in runs:
        m = run["metrics"]
        assert run["error"] == "" and m is not None, run["name"]
        # Real runs: a finite eval loss, one finite training loss per step, and per-run files on disk.
        assert _finite_number(m["final_eval"]["loss"]) and m["final_eval"]["loss"] > 0
        assert m["steps"] >= 2 and len(m["train_loss"]) == m["steps"]
        assert all(_finite_number(v) for v in m["train_loss"])
        assert (out / "runs" / run["name"] / "metrics.json").is_file()
        assert _finite_number(run["summary"]["step_time_mean_s"]) and run["summary"]["step_time_mean_s"] > 0
    # Different runs of one stage really differ (no copied or hard-coded numbers). A later stage may rerun a
    # setting an earlier one had (damping's fitted rule can land exactly on a grid value) and then ties it.
    stages: dict[int, list[float]] = {}
    for r in runs:
        stages.setdefault(r.get("tags", {}).get("stage", 1), []).append(r["metrics"]["final_eval"]["loss"])
    for stage, losses in stages.items():
        assert len(set(losses)) == len(losses), (stage, losses)
    table = (out / "table.md").read_text()
    assert table.startswith(f"# {name} (smoke preset)") and "|---" in table
    for fig in results["analysis"]["figures"]:
        data = (out / fig).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, fig
        assert f"![{fig}]({fig})" in table


def test_batch_sweep_picks_the_best_lr_and_repeats_it_with_seeds(smoke):
    results = json.loads((smoke["batch_sweep"] / "results.json").read_text())
    runs = results["runs"]
    for batch, a in results["analysis"]["per_batch"].items():
        for method, m in a["methods"].items():
            seed0 = [r for r in runs if r["tags"]["method"] == method and r["tags"]["batch"] == int(batch)
                     and r["tags"]["seed"] == 0]  # fmt: skip
            best = min(seed0, key=lambda r: r["metrics"]["final_eval"]["loss"])
            assert m["lr"] == best["tags"]["lr"]
            repeats = [r for r in runs if r["tags"]["method"] == method and r["tags"]["batch"] == int(batch)
                       and r["tags"]["lr"] == m["lr"]]  # fmt: skip
            assert m["seeds"] == len(repeats) == 2
            losses = [r["metrics"]["final_eval"]["loss"] for r in repeats]
            assert m["eval_loss"] == pytest.approx(sum(losses) / 2)
            assert _finite_number(a["target_eval_loss"])


def test_curvature_quality_logs_the_index(smoke):
    results = json.loads((smoke["curvature_quality"] / "results.json").read_text())
    for run in results["runs"]:
        q = run["metrics"]["quality_index"]
        assert len(q) >= 3 and all(_finite_number(p["quality_index"]) and p["quality_index"] > 0 for p in q)
    for method, a in results["analysis"]["methods"].items():
        assert _finite_number(a["spread_at_step"]) and _finite_number(a["spread_at_examples"]), method
        assert a["follows"] in ("iterations", "examples")


def test_dataset_size_reports_epochs_and_both_families(smoke):
    results = json.loads((smoke["dataset_size"] / "results.json").read_text())
    a = results["analysis"]
    # The smallest set is seen for more epochs than the largest, in both families.
    for family in ("cifar", "shakespeare"):
        sizes = sorted(int(s) for s in a[family])
        small, large = a[family][str(sizes[0])], a[family][str(sizes[-1])]
        assert small["methods"]["adamw"]["epochs"] > large["methods"]["adamw"]["epochs"]
        assert _finite_number(small["methods"]["kfac"]["gap"])
        assert "kfac" in small["advantage_over_adamw"]


def test_early_curvature_counts_refreshes_and_compares_auto(smoke):
    results = json.loads((smoke["early_curvature"] / "results.json").read_text())
    cells = results["analysis"]["cells"]
    assert cells["adamw"]["refreshes"] == 0 and cells["adamw"]["step_time_vs_adamw"] == pytest.approx(1.0)
    # Frozen after the frequent phase: exactly the frequent phase's refreshes (30 steps x 0.1 -> 3 steps, every 2).
    assert cells["f0.1-k0"]["refreshes"] == 2
    assert cells["always"]["refreshes"] == 15 and cells["f0.5-k10"]["refreshes"] > cells["f0.5-k0"]["refreshes"]
    auto = cells["f0.1-kauto"]
    assert auto["block_refreshes"] and auto["frozen_blocks"] is not None
    assert results["analysis"]["auto_vs_best_fixed"]
    # Second stage: the best fixed and the best auto cell of the grid again at seed 1, compared seed by seed.
    paired = results["analysis"]["auto_vs_best_fixed_paired"]
    best = results["analysis"]["best_fixed"]
    grid = {r["name"]: r for r in results["runs"] if r["tags"]["kind"] == "auto"}
    best_auto = max(grid, key=lambda n: grid[n]["metrics"]["final_eval"]["accuracy"])
    assert paired["fixed"] == best and paired["auto"] == best_auto and paired["seeds"] == [0, 1]
    runs = {r["name"]: r["metrics"] for r in results["runs"]}
    assert runs[f"{best}-seed1"]["config"]["train"]["seed"] == 1 and runs[best]["config"]["train"]["seed"] == 0
    assert runs[f"{best_auto}-seed1"]["param_sq_sum"] != runs[best_auto]["param_sq_sum"]  # really another seed
    diffs = []
    pairs = [(best, best_auto), (f"{best}-seed1", f"{best_auto}-seed1")]
    for row, (f, a) in zip(paired["rows"], pairs, strict=True):
        fa, aa = runs[f]["final_eval"]["accuracy"], runs[a]["final_eval"]["accuracy"]
        assert (row["fixed_accuracy"], row["auto_accuracy"]) == (fa, aa)
        assert row["auto_refreshes"] == pytest.approx(sum(runs[a]["block_refreshes"].values())
                                                      / len(runs[a]["block_refreshes"]))  # fmt: skip
        diffs.append(aa - fa)
    assert paired["accuracy_diff_mean"] == pytest.approx(sum(diffs) / 2)
    assert paired["accuracy_diff_sd"] == pytest.approx(abs(diffs[0] - diffs[1]) / math.sqrt(2))
    assert len([r for r in results["runs"] if r["tags"]["kind"] == "repeat"]) == 2
    table = (smoke["early_curvature"] / "table.md").read_text()
    assert "Repeated over seeds 0, 1" in table and "Paired accuracy difference" in table


def _record(name: str, kind: str, acc: float, seed: int | None, fraction: float = 0.1) -> Record:
    tags = {"kind": kind, "fraction": fraction, "interval": 10 if "k10" in name else "auto"}
    if kind == "repeat":
        tags["of"] = name.split("-seed")[0]
    overrides = [f"train.seed={seed}"] if seed is not None else []
    summary = {"eval_accuracy": acc, "eval_loss": 2.0 - acc, "block_refreshes": {"a": 4 if "k10" in name else 3}}
    return Record(name, tags, overrides, Path("."), {"config": {"train": {"seed": 0}}}, summary)


def test_early_curvature_pairs_by_effective_seed_and_skips_other_user_grids():
    from ds_soo.experiments.early_curvature import _paired, cells

    # A user sweep over train.seed: the grid's own runs carry the seeds; no repeat stage is added.
    recs = [_record(f"{n}@seed={s}", "fixed" if "k10" in n else "auto", acc, s)
            for s, (fa, aa) in enumerate([(0.30, 0.32), (0.28, 0.27), (0.31, 0.35)])
            for n, acc in (("f0.1-k10", fa), ("f0.1-kauto", aa))]  # fmt: skip
    best = max((r for r in recs if r.tags["kind"] == "fixed"), key=lambda r: r.summary["eval_accuracy"])
    v = _paired(recs, best, next(r for r in recs if r.tags["kind"] == "auto"))
    assert v["seeds"] == [0, 1, 2] and v["fixed"] == "f0.1-k10"
    assert v["accuracy_diff_mean"] == pytest.approx((0.02 - 0.01 + 0.04) / 3)
    assert v["auto_refreshes"] == 3 and v["equal_or_better_with_fewer"]
    names = {c.name for c in cells("smoke", recs)}
    assert not any("-seed" in n for n in names)
    # A user grid over the lr: runs of different lrs are never paired.
    lr = [_record(f"{n}@lr={x}", "fixed" if "k10" in n else "auto", 0.3, None) for n in ("f0.1-k10", "f0.1-kauto")
          for x in (0.1, 0.3)]  # fmt: skip
    assert _paired(lr, lr[0], lr[2]) is None


def test_damping_fits_and_runs_the_scaled_rule(smoke):
    results = json.loads((smoke["damping"] / "results.json").read_text())
    a = results["analysis"]
    assert a["fit"]["points"] == 4
    scaled = [r for r in results["runs"] if r["tags"]["stage"] == 2]
    assert len(scaled) == 4
    for r in scaled:
        d = r["metrics"]["config"]["precond"]["damping"]
        assert d["kind"] == "scaled" and d["value"] == pytest.approx(a["fit"]["rho0"])
        assert d["batch_exponent"] == pytest.approx(a["fit"]["batch_exponent"])
    adaptive = [r for r in results["runs"] if r["tags"]["stage"] == 3]
    assert len(adaptive) == 4
    for r in adaptive:  # the trainer fed the Levenberg-Marquardt rule after every 5th step (16 or 4 steps)
        assert r["metrics"]["config"]["precond"]["damping"]["kind"] == "adaptive"
        assert r["metrics"]["precond_metrics"]["damping_adaptations"] == r["metrics"]["steps"] // 5
    assert any(r["metrics"]["precond_metrics"]["damping"] != 1e-3 for r in adaptive), "the damping never moved"
    by_batch = {row["batch"]: row for row in a["rules_by_batch"]}
    assert sorted(by_batch) == [32, 128]
    for row in by_batch.values():
        assert all(_finite_number(row[k]["eval_loss"]) for k in ("default", "scaled", "adaptive")), row


def test_rerun_resumes_without_training_again(smoke, capsys):
    out = smoke["damping"]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")}
    t0 = time.perf_counter()
    assert run_experiment("damping", "smoke", out, jobs=2) == 0
    assert time.perf_counter() - t0 < 30
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")} == stamps
    assert capsys.readouterr().out.count("(already done)") == len(stamps)


def test_repeat_seeds_flag_parses_ranges_and_applies_to_early_curvature_only(tmp_path, capsys):
    from ds_soo.experiments.cli import parse_seeds
    from ds_soo.experiments.early_curvature import cells

    assert parse_seeds("1-3,7,2") == [1, 2, 3, 7] and parse_seeds("5") == [5]
    for bad in ("3-1", "a", "-2", "1,,2"):
        with pytest.raises(ConfigError, match="--repeat-seeds"):
            parse_seeds(bad)
    assert main(["damping", "--preset", "smoke", "--out", str(tmp_path / "d"), "--repeat-seeds", "1-2"]) == 2
    assert "--repeat-seeds applies to ['early_curvature']" in capsys.readouterr().err
    assert not (tmp_path / "d" / "runs").exists()
    # After the grid, the pair is repeated at exactly the given seeds; the grid's own seed is not rerun.
    grid = cells("smoke", [])
    recs = [Record(c.name, c.tags, c.override_strings(), Path("."), {"config": {"train": {"seed": 0}}},
                   {"eval_accuracy": 0.2 + 0.01 * i, "eval_loss": 2.0}) for i, c in enumerate(grid)]  # fmt: skip
    def best(kind: str) -> str:
        return max((r for r in recs if r.tags["kind"] == kind), key=lambda r: r.summary["eval_accuracy"]).name

    assert (best("fixed"), best("auto")) == ("f0.5-k10", "f0.5-kauto")  # accuracy grows along the grid
    recs[[r.name for r in recs].index("f0.1-kauto")].summary["eval_accuracy"] = 0.9  # now the best auto cell
    extra = [c for c in cells("smoke", recs, repeat_seeds=[0, 3, 4]) if c.tags["kind"] == "repeat"]
    assert sorted((c.tags["of"], c.overrides["train.seed"]) for c in extra) == sorted(
        (n, s) for n in ("f0.5-k10", "f0.1-kauto") for s in (3, 4))
    assert {c.tags["seed"] for c in cells("smoke", recs) if c.tags["kind"] == "repeat"} == {1}  # the preset's


def test_bad_input_is_rejected_before_any_run(tmp_path, capsys):
    assert main(["damping", "--preset", "smoke", "--out", str(tmp_path / "x"), "optim.lrr=0.1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert not (tmp_path / "x" / "runs").exists()
    with pytest.raises(ConfigError, match="--jobs"):
        run_experiment("damping", "smoke", tmp_path / "y", jobs=0)
    with pytest.raises(SystemExit):
        main(["no_such_experiment", "--out", str(tmp_path / "z")])


# ----------------------------------------------------------------------------- analysis helpers


def test_power_law_fit_recovers_known_exponents():
    points = [(b, lr, 0.02 * (b / 128) ** 0.7 * (lr / 0.1) ** 0.4) for b in (32, 128, 512) for lr in (0.03, 0.1, 0.3)]
    fit = fit_power_law(points, 128.0, 0.1)
    assert fit["rho0"] == pytest.approx(0.02) and fit["r2"] == pytest.approx(1.0)
    assert fit["batch_exponent"] == pytest.approx(0.7) and fit["lr_exponent"] == pytest.approx(0.4)
    one_lr = fit_power_law([(32, 0.1, 1e-3), (128, 0.1, 4e-3)], 64.0, 0.1)
    assert one_lr["batch_exponent"] == pytest.approx(1.0) and one_lr["lr_exponent"] == 0.0


def test_quality_spread_and_interpolation():
    assert _log_spread([1.0, math.e]) == pytest.approx(1.0)
    assert _log_spread([2.0]) is None
    # Log-linear between (10, 1) and (20, 100): the midpoint is 10.
    assert _interp([(10, 1.0), (20, 100.0)], 15) == pytest.approx(10.0)
    assert _interp([(10, 1.0), (20, 100.0)], 25) is None


def test_summary_and_steps_to_target_use_per_step_times():
    m = {"final_eval": {"loss": 1.5, "accuracy": 0.5}, "train_loss": [3.0] * 9 + [1.0], "steps": 10,
         "step_times_s": [0.1] * 5 + [0.3] * 5, "step_time_median_s": 0.2, "diverged": False,
         "eval_history": [{"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.5}]}  # fmt: skip
    s = summarise(m)
    assert s["train_loss"] == 1.0 and s["step_time_mean_s"] == pytest.approx(0.2) and s["train_time_s"] == 2.0
    assert steps_to_target(s, 2.0, m) == (5, pytest.approx(0.5))
    assert steps_to_target(s, 1.0, m) == (None, None)
    assert summarise({**m, "diverged": True})["eval_loss"] == math.inf
    assert mean_step_time({"step_time_mean_s": 0.25}) == 0.25 and mean_step_time({}) is None
    assert summarise(None)["eval_loss"] == math.inf


def test_records_are_what_reports_read():
    r = Record("a", {"x": 1}, [], Path("."), None, summarise(None))
    assert not r.summary["ok"]


def test_a_failing_run_is_reported_and_not_marked_finished(tmp_path, monkeypatch):
    from ds_soo.experiments.runner import RunSpec, finished, run_all

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    spec = RunSpec("bad", str(REPO / "configs" / "tiny.yaml"), ["optim.nope=1"], tmp_path / "bad")
    lines = []
    results = run_all([spec], jobs=1, isolated=True, print_fn=lines.append)
    assert results["bad"].metrics is None and "exit 2" in results["bad"].error
    assert lines == [lines[0]] and "[1/1] bad: FAILED (exit 2" in lines[0]
    assert finished(spec) is None and not (spec.out / "spec.json").exists()
    # A folder that is not a training run is never cleared.
    other = RunSpec("other", None, [], tmp_path / "other")
    other.out.mkdir()
    (other.out / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="not a training run"):
        run_all([other], jobs=1, isolated=True, print_fn=lines.append)
    assert (other.out / "notes.txt").read_text() == "mine"
