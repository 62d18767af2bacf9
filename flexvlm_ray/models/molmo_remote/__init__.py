"""A remote-code Molmo / MolmoE checkpoint folder (trust_remote_code opted in): adapter.py."""
