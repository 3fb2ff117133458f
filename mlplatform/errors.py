"""Errors the library raises for bad configuration, shared by the spec and the sections it embeds."""


class SettingError(ValueError):
    """A configuration value is missing or malformed; the message names the setting and file."""
