"""EMA of the trained weights: the warm-up ramp against a float64 recurrence, and the plain rate without it."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from d3ds2.training.ema import EMA


@pytest.mark.parametrize("warmup", [True, False])
def test_shadow_follows_the_recurrence(warmup):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    module = SimpleNamespace(net=nn.Linear(3, 2), device=torch.device("cpu"))
    ema = EMA(decay=0.99, warmup=warmup)
    ema.on_fit_start(None, module)
    ref = module.net.weight.detach().double().clone()
    for step in range(1, 41):
        with torch.no_grad():
            module.net.weight.copy_(torch.randn(2, 3, generator=gen))
        ema.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, step - 1)
        n = step - 1
        d = min(0.99, (1 + n) / (10 + n)) if warmup else 0.99
        ref = d * ref + (1 - d) * module.net.weight.detach().double()
    torch.testing.assert_close(ema.shadow["weight"].double(), ref, rtol=1e-6, atol=1e-6)
    assert ema.decay_at(0) == (0.1 if warmup else 0.99) and ema.decay_at(10**6) == 0.99
