"""Thin Prefect tasks: load inputs, call one core function, run the gate, write outputs, log to MLflow."""
