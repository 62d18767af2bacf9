"""flexvlm-ray: adaptive vision-language model inference studies on Ray."""

__version__ = "0.1.0"
