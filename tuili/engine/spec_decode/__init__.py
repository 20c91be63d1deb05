"""Speculative decoding: proposers guess a request's next tokens, one target forward verifies
them all, and rejection sampling keeps what the target would have produced."""
