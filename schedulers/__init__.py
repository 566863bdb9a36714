"""Host-side schedulers: local (batching, model choice per step) and global (placement)."""
