"""Canaries: tokens, kinds, minting, and the in-memory index listeners match against."""
