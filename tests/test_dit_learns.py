"""A tiny SS-DiT and index DiT learn to map two conditions to two different shapes (CPU)."""
import torch

from d3ds2.flow import FlowSampler, drop_conditions, flow_matching_loss, guided_velocity, interpolate, null_condition, velocity_target
from d3ds2.models.dense_dit import DenseDiT
from d3ds2.models.sparse_dit import SparseDiT
from d3ds2.sparse import SparseTensor


def train(model, x0, conds, call, rows, steps=200, lr=3e-3):
    """Flow-matching steps on one fixed batch; rows(t [B]) broadcasts per-sample t against x0."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.rand(conds.shape[0], generator=gen)
        cond, _ = drop_conditions(conds, 0.1, generator=gen)
        loss = flow_matching_loss(call(interpolate(x0, noise, rows(t)), t * 1000, cond), velocity_target(x0, noise))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_sparse_dit_maps_conditions_to_shapes():
    torch.manual_seed(0)
    res = 6
    g = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).view(-1, 3)
    coords = g[((g.float() + 0.5 - res / 2).norm(dim=1) - 2).abs() < 0.9]  # one shell of latent cells
    n = len(coords)
    shape_a = torch.sin(coords.float() @ torch.randn(3, 4))  # two "shapes": latents on the same cells
    shape_b = -shape_a.flip(1)
    conds = torch.randn(2, 3, 16)
    x = SparseTensor.from_samples([shape_a, shape_b], [coords, coords])
    model = SparseDiT(in_channels=4, model_channels=32, cond_channels=16, num_blocks=2, num_heads=4, num_kv_heads=2, attention="full")
    train(model, x.feats, conds, lambda xt, t, c: model(x.replace(xt), t, c).feats, lambda t: t[x.batch_ids, None])
    model.eval()
    one = SparseTensor(torch.zeros(n, 0), torch.cat([torch.zeros(n, 1, dtype=torch.int32), coords.int()], 1), 1)
    for cond, target, other in [(conds[:1], shape_a, shape_b), (conds[1:], shape_b, shape_a)]:
        def velocity(f, t, w):
            return guided_velocity(lambda xx, tt, cc: model(xx, tt, cc).feats, one.replace(f), t, cond, null_condition(cond), w)

        out = FlowSampler(20, 1.0, guidance=2.0).sample(velocity, torch.randn(n, 4), 1)
        assert (out - target).pow(2).mean() < 0.25 * (out - other).pow(2).mean()


def test_index_dit_maps_conditions_to_latents():
    torch.manual_seed(1)
    z = torch.randn(2, 2, 2, 2, 2)
    conds = torch.randn(2, 3, 16)
    model = DenseDiT(resolution=2, in_channels=2, model_channels=32, cond_channels=16, num_blocks=2, num_heads=4)
    train(model, z, conds, model, lambda t: t.view(-1, 1, 1, 1, 1))
    model.eval()
    for i in range(2):
        cond = conds[i : i + 1]

        def velocity(x, t, w):
            return guided_velocity(model, x, t, cond, null_condition(cond), w)

        out = FlowSampler(20, 1.0, guidance=2.0).sample(velocity, torch.randn(1, 2, 2, 2, 2), 1)
        assert (out - z[i]).pow(2).mean() < 0.25 * (out - z[1 - i]).pow(2).mean()
