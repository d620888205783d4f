"""Occupancy/pruning head vs the official all-children decoder on CPU: a tiny VAE trained on three analytic
shapes at R = 32 (same seed, same steps); reports eval decoded voxels, losses and F-score@0.02 against the
iso-0 surface of the ground-truth SDF. Usage: python benchmarks/vae_pruning_head.py STEPS
"""
import torch, time, json, sys
torch.manual_seed(0)
from d3ds2.data.sdf_transforms import analytic_sample, collate
from d3ds2.models.sparse_sdf_vae import SparseSDFVAE
from d3ds2.models.vae_losses import VAELossWeights, vae_loss
from d3ds2.geometry.marching_cubes import sparse_marching_cubes
from d3ds2.geometry.metrics import mesh_metrics
TINY = dict(model_channels=64, encoder_channels=(16, 32, 32, 64), decoder_channels=(32, 16, 16), num_blocks=2, num_heads=4, latent_channels=8)
batch = collate([analytic_sample(s, 32) for s in ("sphere", "box", "torus")], 8.0)
band = batch.targets.coords[batch.targets.feats[:, 1] > 0.5]
res = {}
for occ in (False, True):
    torch.manual_seed(0)
    vae = SparseSDFVAE(**TINY, occupancy_head=occ)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    t = time.time()
    for step in range(int(sys.argv[1])):
        out, post = vae(batch.inputs, target_coords=band if occ else None)
        loss, terms = vae_loss(out, post, batch.targets, VAELossWeights())
        opt.zero_grad(); loss.backward(); opt.step()
    dt = (time.time() - t) / int(sys.argv[1])
    vae.eval()
    with torch.no_grad():
        out, post = vae(batch.inputs, sample=False)
        _, terms = vae_loss(out, post, batch.targets, VAELossWeights())
    fs = []
    for i in range(3):
        g = batch.targets.sample(i); p = out.sdf.sample(i)
        gm = sparse_marching_cubes(g[1], g[0][:, 0], 32); pm = sparse_marching_cubes(p[1], p[0][:, 0], 32)
        fs.append(mesh_metrics(pm, gm, 20000, (0.02,))["fscore@0.02"] if len(pm.faces) else 0.0)
    res["occupancy_head" if occ else "all_children"] = {"train_s_per_step": dt, "eval_decoded_voxels": out.sdf.num_voxels,
        "target_voxels": batch.targets.num_voxels, "band_voxels": int(band.shape[0]),
        "eval_L_in": float(terms["in"]), "eval_L_ext": float(terms["ext"]), "fscore@0.02_vs_gt_iso": sum(fs) / 3}
    print(json.dumps(res), flush=True)
