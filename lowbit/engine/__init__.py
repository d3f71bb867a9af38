"""The paged engine: sequences, KV blocks, scheduler, model runner."""
