"""bench/launches.py in its tiny configuration: real counts for every ds_soo method and AdamW."""

from __future__ import annotations

import dataclasses

from infra.bench import load_bench

launches = load_bench("launches")
peers = launches.peers


def test_counts_are_real_and_follow_the_schedule(capsys):
    report = launches.main(["--preset", "tiny", "--workload", "gpt", "--methods", "adamw", "kfac", "shampoo",
                            "psgd", "--interval", "3", "--timed", "2"])  # fmt: skip
    rows = {r["method"]: r for r in report["workloads"]["gpt"]["rows"]}
    assert set(rows) == {"adamw", "kfac", "shampoo", "psgd"} and all(r["status"] == "ok" for r in rows.values())
    for name, r in rows.items():
        for key in ("sparse", "refresh"):
            c = r[key]
            assert 0 < c["launching_ops"] <= c["all_ops"], (name, key, c)
        assert r["host_ms"] > 0
    for name in ("kfac", "shampoo", "psgd"):
        sparse, refresh = rows[name]["sparse"], rows[name]["refresh"]
        # A sparse step defers every decision to one read; a refresh step does strictly more work.
        assert sparse["host_syncs"] == 1, (name, sparse)
        assert refresh["launching_ops"] > sparse["launching_ops"], name
    # AdamW has no refresh: both counted steps launch the same ops.
    assert rows["adamw"]["sparse"]["all_ops"] == rows["adamw"]["refresh"]["all_ops"]
    out = capsys.readouterr().out
    assert "| kfac |" in out and "ops vs AdamW" in out


def test_counts_do_not_depend_on_the_batch():
    w = launches.WORKLOADS["tiny"]["gpt"]
    one = launches.measure("kfac", w, 3, 1)
    two = launches.measure("kfac", dataclasses.replace(w, batch=3), 3, 1)
    assert (one.sparse.all_ops, one.refresh.all_ops) == (two.sparse.all_ops, two.refresh.all_ops)
    assert (one.sparse.host_syncs, one.refresh.host_syncs) == (two.sparse.host_syncs, two.refresh.host_syncs)
