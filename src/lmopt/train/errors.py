"""The training layer's error types (own module, so that config and run-folder code can share them)."""


class ConfigError(ValueError):
    """An invalid training configuration, or a run that cannot be started or resumed as asked."""
