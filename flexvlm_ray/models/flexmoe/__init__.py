"""The MolmoE-style family: a CLIP-style ViT, attention pooling and projector, an OLMoE decoder.

config.py (shape, presets, tokenizer), model.py (the torch modules), preprocess.py (crops and prompt),
flops.py (analytic FLOPs), checkpoint.py (a released MolmoE folder), adapter.py (the ModelAdapter),
fast/ (the fast backend: decoder.py and its Triton kernels in ops.py)."""
