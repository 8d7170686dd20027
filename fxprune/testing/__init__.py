"""Test helpers shipped with fxprune: a local Messages-API server, tiny model zoo, equivalence checks."""
