"""Does nothing: measures the platform's own overhead."""


def noop(*args, **kwargs):
    return None
