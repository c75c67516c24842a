"""XMask pieces that are neither a model nor a loss: disc geometry and online pseudo instance masks."""
