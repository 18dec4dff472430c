import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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


def test_a_failing_stage_shows_its_whole_error_while_the_noise_goes_to_the_log(tmp_path, capfd, monkeypatch):
    # What a stage's libraries print (Python, C code, child processes alike) goes to the run's log
    # file; the failure's traceback still reaches the terminal, and the log keeps it too.
    def broken_stage(*args, **kwargs):
        print("a worker's metrics dict")
        os.write(2, b"a C++ warning\n")
        subprocess.run([sys.executable, "-c", "print('a child process line')"])
        raise RuntimeError("the stage broke half-way")

    monkeypatch.setattr("ensemble.selection.build.build_ensemble", broken_stage)
    assert main(["ensemble", "--run", str(tmp_path)]) == 1
    out, err = capfd.readouterr()
    assert "Traceback (most recent call last)" in err and "RuntimeError: the stage broke half-way" in err
    assert "in broken_stage" in err  # the whole traceback, not only its last line
    # It failed before it made its folder (RUN/ensemble): the log stays in the temporary folder, and
    # nothing is written into the folder it only read.
    log_path = Path(err.split("warnings) is in ")[1].split("; --verbose")[0])
    assert log_path.parent == Path(tempfile.gettempdir()) and list(tmp_path.iterdir()) == []
    for noise in ("metrics dict", "C++ warning", "child process line"):
        assert noise not in out + err
    log = log_path.read_text()
    log_path.unlink()
    for line in ("a worker's metrics dict", "a C++ warning", "a child process line", "the stage broke half-way"):
        assert line in log
    # --verbose: the same output on the terminal, no log file.
    assert main(["ensemble", "--run", str(tmp_path / "other"), "--verbose"]) == 1
    out, err = capfd.readouterr()
    assert "a worker's metrics dict" in out and "a C++ warning" in err and "the stage broke half-way" in err
    assert not (tmp_path / "other").exists()


def test_a_search_refused_before_its_folder_exists_leaves_nothing_behind(tmp_path):
    # Run as a user would: the error on the terminal, and neither a run folder nor a log in the
    # temporary folder for a search that never started (the one line says all there is to say).
    config = tmp_path / "search.yaml"
    config.write_text(f"name: broken\nbase: {tmp_path / 'missing.yaml'}\nstorage_path: {tmp_path / 'storage'}\n")
    logs = set(Path(tempfile.gettempdir()).glob("gitseg-search-*.log"))
    done = subprocess.run([sys.executable, "-m", "gitseg", "search", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "gitseg search: error:" in done.stderr and "missing.yaml" in done.stderr
    assert "is in" not in done.stderr and set(Path(tempfile.gettempdir()).glob("gitseg-search-*.log")) == logs
    assert not (tmp_path / "storage").exists()


def test_version_and_the_choices_of_tta_are_in_the_help(capsys):
    from gitseg import __version__
    from gitseg.arguments import TTA_CHOICES
    from gitseg.cli import build_parser
    from gitseg.infer import TTA_SETS

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"gitseg {__version__}"
    assert tuple(TTA_SETS) == TTA_CHOICES
    parser = build_parser()
    for command in ("ensemble", "distill"):
        help_text = parser._subparsers._group_actions[0].choices[command].format_help()
        assert "{none,hflip,flips}" in help_text, help_text
    with pytest.raises(SystemExit):
        main(["ensemble", "--run", "x", "--tta", "vflip"])
    assert "invalid choice: 'vflip'" in capsys.readouterr().err


def test_a_damaged_ensemble_manifest_names_the_file_and_what_to_do(tmp_path, capfd):
    folder = tmp_path / "ensemble"
    folder.mkdir()
    (folder / "ensemble.json").write_text('{"format": 1, "members": [')  # cut short, as by a full disk
    assert main(["predict", "--ensemble", str(folder), "--dicom", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capfd.readouterr().err
    assert f"{folder / 'ensemble.json'} is damaged or is not a valid EnsembleManifest" in err
    assert "copy the ensemble folder again, or build it with `gitseg ensemble" in err
    assert not (tmp_path / "o").exists()


def test_a_second_search_with_the_same_name_and_storage_refuses(train_cache, tmp_path):
    from conftest import write_configs

    from gitseg.files import folder_lock
    from search.run import run_search
    from search.settings import load_search_config
    from search.storage import experiment_root

    settings = load_search_config(write_configs(tmp_path, train_cache, "twice", epochs=1))
    with folder_lock(experiment_root(settings.storage_path, "twice"), "gitseg search"):
        with pytest.raises(FileExistsError, match=rf"twice is in use by gitseg search \(pid {os.getpid()} on host"):
            run_search(settings, log=lambda *_: None)
    assert not (tmp_path / "storage" / "twice").exists()  # refused before Ray or Tune wrote anything
