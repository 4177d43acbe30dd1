"""The package version (read by pyproject and written into every manifest)."""

__version__ = "0.1.0"
