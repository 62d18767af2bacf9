"""transformers' Qwen3-VL-MoE behind the adapter contract: adapter.py, flops.py."""
