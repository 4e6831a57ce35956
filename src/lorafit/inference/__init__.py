"""Loading base models and adapters, prediction and generation."""
