"""The demo app and its embedded default model."""
