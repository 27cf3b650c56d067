"""Speculative decoding: proposers guess k tokens, the target verifies them in one batched forward."""
