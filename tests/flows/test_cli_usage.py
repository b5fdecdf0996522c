"""A refused command line is one error line naming the command (stage) and the option (dataset),
exit 2, like every other bad input; a group called bare still shows its help."""

import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


@pytest.mark.parametrize("argv, line", [
    (["quantize", "--out", "x"], "error: [stage=quantize, dataset=--embeddings] Missing option '--embeddings'. "
                                 "(qarm quantize --help)"),
    (["pairs", "swing", "--interactions", "x", "--out", "y.parquet", "--top-k", "0"],
     "error: [stage=pairs-swing, dataset=--top-k] Invalid value for '--top-k': Input should be greater than "
     "or equal to 1 (qarm pairs swing --help)"),
    (["rank", "compare", "--no-such-option"], "error: [stage=rank-compare, dataset=--no-such-option] "
                                              "No such option: --no-such-option (qarm rank compare --help)"),
    (["train-node", "--node-rank", "0"], "error: [stage=train-node, dataset=--node-rank] Invalid value for "
                                         "'--node-rank': Input should be greater than or equal to 1 (qarm train-node --help)"),
    (["no-such-command"], "error: [stage=qarm, dataset=command line] No such command 'no-such-command'. "
                          "(qarm --help)"),
])
def test_a_refused_command_line_is_one_error_line(argv, line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, argv)
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert [ln for ln in res.output.splitlines() if ln.strip()] == [line]
    assert not any(tmp_path.iterdir())                                   # nothing written


def test_a_group_called_bare_shows_its_help():
    res = runner.invoke(app, ["pairs"])
    assert "swing" in res.output and "error:" not in res.output
