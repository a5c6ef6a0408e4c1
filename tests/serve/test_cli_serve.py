"""`dgconvert serve` options: help lists them; contradictory or out-of-range options stop
with a clear message before Ray starts."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from dgconvert.cli import main


def test_serve_help_lists_the_options() -> None:
    res = CliRunner().invoke(main, ["serve", "--help"])
    assert res.exit_code == 0
    for opt in ("--host", "--port", "--replicas", "--max-batch", "--max-delay-ms", "--full",
                "--split-stages", "--backend", "--threads", "--drain-timeout",
                "--body-timeout", "--header-timeout", "--max-pending-rows", "--thread-pool"):
        assert opt in res.output
    assert "127.0.0.1" in res.output


def test_serve_rejects_bad_options_before_starting(tmp_path: Path) -> None:
    bundle = tmp_path / "m.dg"
    bundle.mkdir()
    res = CliRunner().invoke(main, ["serve", str(bundle), "--split-stages", "--full"])
    assert res.exit_code == 2 and "drop --full" in res.output
    res = CliRunner().invoke(main, ["serve", str(bundle), "--replicas", "0"])
    assert res.exit_code == 2 and "replicas=0" in res.output
    res = CliRunner().invoke(main, ["serve", str(bundle), "--body-timeout", "0"])
    assert res.exit_code == 2 and "body_timeout_s=0" in res.output
    res = CliRunner().invoke(main, ["serve", str(bundle), "--max-pending-rows", "10"])
    assert res.exit_code == 2 and "below max_rows=1024" in res.output
    res = CliRunner().invoke(main, ["serve", str(bundle), "--thread-pool", "global"])
    assert res.exit_code == 2 and "'shared', 'per-session'" in res.output
