"""Stage 5: Semantic IDs from item embeddings (residual k-means + FSQ), with collision metrics."""
