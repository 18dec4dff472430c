import subprocess
import sys

from gitseg.cli import main


def test_synth_prepare_summary(tmp_path, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    assert main(["synth", "--out", str(data), "--cases", "4", "--days", "1", "--slices", "16", "--size", "32"]) == 0
    assert main(["prepare", "--data", str(data), "--out", str(cache), "--size", "32", "--folds", "2",
                 "--holdout", "0.25"]) == 0
    assert main(["summary", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "holdout" in out and "fold 1" in out and "large_bowel" in out


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["prepare", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "error: data root" in err and "Traceback" not in err
    assert main(["summary", "--cache", str(tmp_path)]) == 2
    assert "gitseg prepare" in capsys.readouterr().err


def test_console_script_module_runs():
    out = subprocess.run([sys.executable, "-m", "gitseg", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "synth" in out.stdout and "prepare" in out.stdout
