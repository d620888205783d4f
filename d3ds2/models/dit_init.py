"""Weight initialisation shared by the DiTs (sparse and dense), as in the official release."""
from __future__ import annotations

import torch.nn as nn


def init_dit_weights(model: nn.Module) -> None:
    """Xavier-uniform Linear weights, zero biases; t-embedder N(0, 0.02); adaLN and out_layer zero.

    ``model`` must have ``t_embedder.mlp`` (Linear at 0 and 2), ``blocks`` (each with ``adaLN_modulation``)
    and ``out_layer``.
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.out_layer.weight)
    nn.init.zeros_(model.out_layer.bias)
