"""qarm core library: pure functions and small classes over Arrow tables, DataFrames and typed configs.

Imports neither prefect nor mlflow; heavy libraries (great_expectations, transformers, deepspeed)
are imported lazily inside the functions that need them.
"""

__version__ = "0.1.0"
