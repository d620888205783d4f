"""Data: the shard format (the one place that knows the keys), shard writing and streaming readers."""
