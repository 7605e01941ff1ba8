"""The one exception for a config that asks for something impossible (its own module, so every
module can raise it without importing the config schema)."""


class ConfigError(ValueError):
  """A config asks for something impossible; the message is one line."""
