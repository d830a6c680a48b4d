"""The serving engine of one rank: data-parallel attention with a paged KV cache, continuous
batching, and MoE layers whose experts are reached through a fabric."""
