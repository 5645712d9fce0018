"""cli.py and the scripts' mains: a user error is one line, a bug keeps its traceback, Ctrl-C exits 130
quietly from every script; model.py stays copyable alone."""
import dataclasses
import subprocess
import sys

import pytest

import bench
import cli
import convert_hf
import dataset
import dataset_sft
import download_mini_data
import inference
import inference_sft
import runtime
import train
import train_tokenizer
from conftest import ROOT


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    def bad_input(cfg):
        raise cli.UserError("data/x.jsonl line 3: missing \"text\"")

    with pytest.raises(SystemExit) as e:
        cli.run_guarded(bad_input, None)
    assert e.value.code == 1 and capsys.readouterr().err == "error: data/x.jsonl line 3: missing \"text\"\n"

    def bug(cfg):
        return int("not a number")  # a plain ValueError from inside the code

    with pytest.raises(ValueError, match="invalid literal"):
        cli.run_guarded(bug, None)


def test_a_bug_in_a_script_prints_its_traceback(tmp_path):
    """Through a real script: a plain ValueError raised inside dataset.py is not turned into a line."""
    (tmp_path / "x.txt").write_text("hello\n")
    code = ("import dataset\n"
            "def broken(*args): raise ValueError('internal')\n"
            "dataset.load_tokenizer = broken\n"
            f"dataset.main(['--inputs', {str(tmp_path / 'x.txt')!r}])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ValueError: internal" in r.stderr


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


# (script module, the function its main reaches first that can be made to raise, argv)
MAINS = [
    (bench, "simulated_peak", ["--preset", "tiny", "--memory_only", "true"]),
    (convert_hf, "load_hf", ["--from_hf", "somewhere", "--out", "x.pt"]),
    (dataset, "build_shards", []),
    (dataset_sft, "SFTData", []),
    (download_mini_data, "write_offline_data", ["--offline", "true"]),
    (inference, "load_for_inference", ["--prompt", "x"]),
    (inference_sft, "load_for_inference", ["--prompt", "x"]),
    (train_tokenizer, "sample_lines", []),
]


@pytest.mark.parametrize("module,target,argv", MAINS, ids=[m[0].__name__ for m in MAINS])
def test_ctrl_c_exits_130_without_a_traceback(module, target, argv, monkeypatch, capsys):
    monkeypatch.setattr(module, target, interrupt)
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code == 130 and "Traceback" not in capsys.readouterr().err


def test_ctrl_c_in_the_training_scripts_exits_130():
    with pytest.raises(SystemExit) as e:
        runtime.run_main(interrupt, train.TrainConfig())
    assert e.value.code == 130


@dataclasses.dataclass
class Commented:
    steps: int = 10                # optimizer steps
    lr: float = 1e-3               # peak learning rate,
                                   # after warm-up
    # a section comment is no field's
    seed: int = 0


@dataclasses.dataclass
class Restated(Commented):
    steps: int = 20                # this stage's own steps
    lr: float = 2e-3


def test_the_comment_beside_a_field_is_its_help():
    from cli import field_comments
    assert field_comments(Commented) == {"steps": "optimizer steps", "lr": "peak learning rate, after warm-up"}
    assert field_comments(Restated) == {"steps": "this stage's own steps"}  # lr restated without one: none


def test_a_comment_with_a_percent_sign_is_shown_as_written(capsys):
    @dataclasses.dataclass
    class Percent:
        share: float = 0.3             # 30% of the rows

    with pytest.raises(SystemExit):
        cli.parse_config(Percent, ["--help"])
    assert "30% of the rows" in capsys.readouterr().out
