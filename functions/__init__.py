"""Example functions, each deployable with one command."""

from pathlib import Path

FOLDER = Path(__file__).parent


def source(name: str) -> str:
    """The source text of the example function ``name``."""
    return (FOLDER / f"{name}.py").read_text()
