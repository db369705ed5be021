"""Speculative decoding: draft sources (`DraftSource`), and the per-request draft policy."""
