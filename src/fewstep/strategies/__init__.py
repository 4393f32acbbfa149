"""Training-free strategies that act below the sampler: skip scaling, feature caching, variance rules."""
