"""The fast backend of flexmoe: static KV cache, CUDA graphs, top_k-proportional MoE (decoder.py) and its
Triton kernels (ops.py)."""
