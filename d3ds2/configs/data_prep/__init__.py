"""Data-prep configs (``pkg://d3ds2.configs.data_prep``): meshes -> shards, encode_latents, latent_stats."""
