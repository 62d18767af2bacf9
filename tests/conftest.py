"""Tests never reach a hub: Hugging Face libraries are put offline (and given a throw-away cache)
before anything imports them."""
import os
import tempfile

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="flexvlm-hf-cache-"))
