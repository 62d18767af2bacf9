"""The tiny flexmoe model of the quickstart: its training (examples, heads, train loop) and evaluation."""
