"""Training matchers: the shared loop, checkpoints and the saved model files."""
