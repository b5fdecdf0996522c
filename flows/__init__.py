"""Prefect flows (they only wire tasks together) and the command line (cli.py, rank_cli.py, with the
quantize benchmark it runs, bench_quantize.py)."""
