"""numerics.stats_matmul: K-FAC's statistics products at a chosen precision, always fp32 out."""

import pytest
import torch
from torch import nn

import ds_soo.preconditioner as preconditioner_module
from ds_soo import Preconditioner
from ds_soo.config import ConfigError, PreconditionerConfig
from ds_soo.curvature.precision import gram, stats_precision


@pytest.mark.parametrize("precision", ["float32", "tf32", "bfloat16"])
def test_gram_on_cpu_is_exact_fp32(precision):
    rows = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    out = gram(rows, precision)
    assert out.dtype == torch.float32
    assert torch.equal(out, rows.T @ rows)


def test_tf32_switch_is_scoped_to_cuda_and_restored():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with stats_precision("tf32", torch.device("cpu")):
            assert torch.backends.cuda.matmul.allow_tf32 is False
        with stats_precision("float32", torch.device("cuda")):
            assert torch.backends.cuda.matmul.allow_tf32 is False
        with pytest.raises(RuntimeError), stats_precision("tf32", torch.device("cuda")):
            assert torch.backends.cuda.matmul.allow_tf32 is True
            raise RuntimeError("an error inside leaves the global switch as it was")
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_kfac_statistics_use_the_configured_precision(monkeypatch, precision):
    seen = []

    def spy(rows, p):
        seen.append(p)
        return gram(rows, p)

    monkeypatch.setattr(preconditioner_module, "gram", spy)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    pre = Preconditioner(model, {"method": "kfac", "kfac": {"kl_clip": None},
                                 "numerics": {"stats_matmul": precision}})
    nn.functional.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 3, (16,))).backward()
    assert pre.step()
    assert pre.counters["stats_updates"] == 1 and pre.counters["preconditioned_steps"] == 1
    assert seen == [precision] * 4  # A and G of each of the two layers


def test_stats_matmul_config_error_names_field_and_values():
    with pytest.raises(ConfigError) as err:
        PreconditionerConfig.from_dict({"numerics": {"stats_matmul": "fp8"}})
    msg = str(err.value)
    assert "stats_matmul" in msg and "tf32" in msg and "bfloat16" in msg and "float32" in msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 and bf16 products exist on CUDA only")
@pytest.mark.parametrize(("precision", "tol"), [("float32", 1e-5), ("tf32", 5e-3), ("bfloat16", 2e-2)])
def test_cuda_statistics_stay_close_to_float64(precision, tol):
    rows = torch.randn(4096, 96, generator=torch.Generator().manual_seed(0))
    want = rows.double().T @ rows.double()
    got = gram(rows.cuda(), precision).double().cpu()
    assert ((got - want).abs().max() / want.abs().max()).item() < tol
