"""Small helpers the packages below the loss share (the loss itself never needs them)."""
