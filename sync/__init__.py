"""ideogram-dataset-sync: keep a SQL table of Ideogram datasets current."""

__version__ = "0.1.0"
