"""Reference (HF transformers) side of the conformance harness: tiny checkpoint training."""
