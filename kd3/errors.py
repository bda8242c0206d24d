"""User-facing errors: the CLI prints them as one line and exits 2, without a traceback."""


class Kd3Error(Exception):
    """A problem with the user's input (config, file, URL list, checkpoint) that they can fix."""


class ConfigError(Kd3Error):
    """Invalid configuration: names the key and the file."""


class RunFolderError(Kd3Error):
    """A stage's output folder is in a state the requested mode refuses (e.g. non-empty)."""
