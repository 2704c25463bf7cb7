"""Model updates: taking a stored version into the running engine, and back."""
