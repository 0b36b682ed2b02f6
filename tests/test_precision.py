"""`auto` precision: bfloat16 only where the hardware has it, and the same loss as the precision it resolves to."""

import pytest
import torch

from llmd4rec import precision
from llmd4rec.config import load_config
from llmd4rec.models.sasrec import SASRec
from llmd4rec.training.crm import rec_loss


@pytest.fixture
def cpu_units(monkeypatch):
    """Pretend this CPU has (or lacks) bfloat16 units."""
    def set_units(amx: bool, avx512_bf16: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        precision.native_bfloat16.cache_clear()
    yield set_units
    precision.native_bfloat16.cache_clear()


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (True, False, "bfloat16"), (False, True, "bfloat16"), (True, True, "bfloat16"), (False, False, "float32")])
def test_auto_follows_the_cpu_units(cpu_units, amx, avx512_bf16, expected):
    cpu_units(amx, avx512_bf16)
    assert precision.resolve("auto", "cpu") == expected
    assert precision.resolve("float32", "cpu") == "float32" and precision.resolve("bfloat16", "cpu") == "bfloat16"
    cfg = precision.resolve_config(load_config(None, []), torch.device("cpu"))
    assert (cfg.crm_train.precision, cfg.text.dtype) == (expected, expected)


def test_auto_is_float32_on_devices_without_known_bf16_units():
    assert precision.resolve("auto", "meta") == "float32"


@pytest.mark.parametrize("units", [True, False])
def test_auto_loss_equals_the_resolved_precision(cpu_units, units):
    cpu_units(units, units)
    torch.manual_seed(0)
    model = SASRec(40, load_config(None, ["crm.hidden=16"]).crm)
    h, targets = torch.randn(12, 16), torch.randint(1, 41, (12,))
    gen = torch.Generator().manual_seed(0)
    losses = {p: rec_loss(model, h, targets, load_config(None, [f"crm_train.precision={p}"]).crm_train, gen)[0]
              for p in ("auto", "float32", "bfloat16")}
    assert torch.equal(losses["auto"], losses["bfloat16" if units else "float32"])
    assert not torch.equal(losses["float32"], losses["bfloat16"])  # the two precisions do differ on this input
