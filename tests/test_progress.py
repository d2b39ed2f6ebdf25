"""Long-running commands show progress on stderr, also into a pipe when asked (--progress), and say nothing but
their results with --quiet (issue 24). run_cli captures both streams through pipes: no terminal here."""

from __future__ import annotations

import re

import pytest

from conftest import run_cli

BAR = re.compile(r"\[[#.]{24}\] \d+/\d+|\d+%\|")  # core.progress.Progress, or tqdm (calibration)


def _commands(tiny_bundles, tmp_path):
    bundle = str(tiny_bundles["gqa56"])
    return {
        "export": (["export-mllm", "--model", "tiny-llava", "-o", str(tmp_path / "b"), "--no-verify", "--force"], False),
        "calib": (["calib-mllm", "--model", "tiny-llava", "--method", "fitprune", "--budget", "0.5", "--data",
                   "builtin:synthetic:3", "-o", str(tmp_path / "r.json")], True),
        "bench": (["bench-mllm", bundle, "--repeats", "2", "--new-tokens", "2"], True),
        "eval": (["eval-mllm", bundle, "--dataset", "shapes-vqa:test:3"], True),
        "demo": (["demo-mllm", "--workdir", str(tmp_path / "demo"), "--questions", "4", "--calib", "2"], True),
    }


@pytest.mark.parametrize("name", ["export", "calib", "bench", "eval", pytest.param("demo", marks=pytest.mark.slow)])
def test_progress_goes_to_stderr_and_quiet_silences_it(name, tiny_bundles, tmp_path):
    command, prints_results = _commands(tiny_bundles, tmp_path)[name]
    shown = run_cli(command[0], *command[1:], "--progress")
    assert shown.returncode == 0, shown.stderr
    assert BAR.search(shown.stderr), shown.stderr[-800:]
    assert not BAR.search(shown.stdout) and "\r" not in shown.stdout
    quiet = run_cli(command[0], *command[1:], "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr[-800:]
    assert bool(quiet.stdout.strip()) == prints_results  # the results themselves are not silenced


def test_progress_and_quiet_exclude_each_other(capsys):
    from mllm_deploy.calib import flops_cli

    with pytest.raises(SystemExit) as exit_:
        flops_cli.main(["--model", "tiny-llava", "--progress", "--quiet"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
