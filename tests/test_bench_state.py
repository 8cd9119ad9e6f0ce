"""bench/state_memory.py on the tiny models: exact state counts, split consistently, packing visible."""

from __future__ import annotations

import json

from infra.bench import load_bench

state_memory = load_bench("state_memory")


def test_tiny_state_table_splits_ds_soo_state_and_shows_the_packing(tmp_path, capsys):
    out = tmp_path / "state.json"
    methods = ["shampoo", "shampoo-dense", "kfac", "psgd", "meta-shampoo"]
    report = state_memory.main(["--preset", "tiny", "--methods", *methods, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    peers = state_memory.peers
    for entry in report["workloads"]:
        rows = entry["methods"]
        assert list(rows) == ["adamw", *methods]
        w = peers.PRESETS["tiny"][entry["workload"]]
        params = sum(p.numel() for p in peers.build_model(w, 65, 10).parameters())
        # AdamW: two fp32 moments per parameter (+ scalar step counts).
        assert 2 * 4 * params <= rows["adamw"]["state_bytes"] < 2 * 4 * params + 4096
        for m in ("shampoo", "shampoo-dense", "kfac", "psgd"):
            r = rows[m]
            assert r["statistics"] + r["roots"] + r["grafting"] + r["rest"] == r["state_bytes"], m
            assert r["roots"] > 0, m
            # The rest holds at least the outer SGD's momentum, one fp32 per parameter.
            assert r["rest"] >= 4 * params, m
        packed, dense = rows["shampoo"], rows["shampoo-dense"]
        # Packing changes the statistics only, and about halves them (diagonal blocks stay vectors).
        assert dense["state_bytes"] - packed["state_bytes"] == dense["statistics"] - packed["statistics"]
        assert 0.45 * dense["statistics"] < packed["statistics"] < 0.6 * dense["statistics"]
        assert (packed["roots"], packed["grafting"], packed["rest"]) == (dense["roots"], dense["grafting"],
                                                                          dense["rest"])  # fmt: skip
        assert rows["meta-shampoo"]["state_bytes"] > rows["adamw"]["state_bytes"]
    table = capsys.readouterr().out
    assert "| shampoo-dense |" in table and "/ Meta Shampoo" in table
