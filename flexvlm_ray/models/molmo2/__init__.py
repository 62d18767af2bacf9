"""transformers' native Molmo2 behind the adapter contract: adapter.py, preprocess.py, flops.py."""
