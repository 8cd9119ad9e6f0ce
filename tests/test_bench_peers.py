"""bench/peers.py in its tiny CPU configuration: every method, peers included, gives real, finite numbers."""

from __future__ import annotations

import json
import math

import pytest
from infra.bench import load_bench

peers = load_bench("peers")


def test_missing_peer_archive_is_reported_not_fatal(tmp_path):
    status = peers.extract_peers(tmp_path / "nowhere", tmp_path / ".peers")
    assert set(status) == {"meta-shampoo", "kfac-pytorch"}
    assert all(s.startswith("missing") for s in status.values())


def test_conv1d_swap_keeps_the_function():
    import torch
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(5, 3)
    wrapped = torch.nn.Sequential(conv)
    x = torch.randn(4, 3)
    want = conv(x)
    peers.conv1d_to_linear(wrapped)
    assert isinstance(wrapped[0], torch.nn.Linear)
    torch.testing.assert_close(wrapped(x), want)


def test_state_bytes_counts_optimizer_state_not_the_model():
    import torch

    model = torch.nn.Linear(10, 4)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    # exp_avg + exp_avg_sq for 44 params, fp32, plus two scalar step tensors.
    assert peers.state_bytes([opt], model) == 2 * 44 * 4 + 2 * 4


def test_char_gpt_loss_predicts_the_next_character():
    """The loss the benchmarks train and evaluate is next-character cross entropy over the windows' characters."""
    import torch

    w = peers.Workload("gpt", 1, 32, 3, seq=8)
    text = "".join(chr(97 + (7 * i) % 13) for i in range(400))
    from ds_soo.data.base import CharData

    data = CharData("t", text, 0.1, w.seq, 1, None)
    batch = next(data.train_batches(w.batch, seed=0))
    model = peers.build_model(w, data.vocab_size, 0).eval()  # no dropout: two forwards agree
    logits = model(input_ids=batch["input_ids"]).logits.double()
    ids = batch["input_ids"]
    # Window i's characters are ids[:, i]; the target of position i is the character at i + 1.
    full = torch.cat([ids, batch["labels"][:, -1:]], 1)
    assert torch.equal(batch["labels"], full[:, 1:])
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), full[:, 1:].flatten())
    torch.testing.assert_close(peers.model_loss(model, batch).double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tiny_cpu_table_has_finite_numbers_for_every_method(tmp_path, capsys):
    out = tmp_path / "peers.json"
    report = peers.main(["--preset", "tiny", "--reps", "1", "--warmup", "10", "--steps", "10", "--threads", "1",
                         "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    # The peers are present next to the repository (../shared/peers and the heavyball package).
    assert all(s == "ok" for s in report["peers"].values()), report["peers"]
    assert [w["workload"]["kind"] for w in report["workloads"]] == ["gpt", "vit"]
    for w in report["workloads"]:
        assert set(w["methods"]) == set(peers.METHODS)
        for method, m in w["methods"].items():
            assert m["status"] == "ok", (method, m["status"])
            assert m["steps"] == 10
            assert math.isfinite(m["final_loss"]), method
            for key in ("warm_mean", "sparse_median", "p99"):
                assert 0 < m[key] < 60 and math.isfinite(m["ratio"][key]), (method, key)
            assert m["sparse_median"] <= m["p99"]
            assert m["state_bytes"] > 0
        # Second-order state exceeds AdamW's two moments, except HeavyBall PSGD-Kron, which keeps
        # no second moment and stores its triangular factors packed.
        for method in ("kfac", "shampoo", "psgd", "kfac-pytorch", "meta-shampoo", "hb-soap"):
            assert w["methods"][method]["ratio"]["state"] > 1.0, method
    table = capsys.readouterr().out
    assert "| meta-shampoo |" in table and "n/a (CPU)" in table
