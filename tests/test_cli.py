"""The fxprune command line: profile and compile, on a model file and on torchvision."""

from __future__ import annotations

import json
import textwrap

import onnx
import pytest

from fxprune.cli import main

MODEL_FILE = textwrap.dedent(
    """
    import torch, torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 32, 3, padding=1)
            self.b = nn.Conv2d(32, 32, 3, padding=1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = torch.relu(self.b(torch.relu(self.a(x))))
            return self.fc(x.mean((2, 3)))

    def build():
        return Net()

    def build_with_inputs():
        return Net(), (torch.randn(1, 3, 16, 16),)

    def not_a_model():
        return 3
    """
)


@pytest.fixture()
def model_file(tmp_path):
    p = tmp_path / "net.py"
    p.write_text(MODEL_FILE)
    return str(p)


def test_profile_file_model(model_file, capsys):
    assert main(["profile", f"{model_file}:build", "--input-shape", "1,3,16,16"]) == 0
    out = capsys.readouterr().out
    expected = 16 * 16 * 32 * 27 + 16 * 16 * 32 * 32 * 9 + 320
    assert f"({expected:,})" in out
    assert "module" in out and "share" in out


def test_profile_json(model_file, capsys):
    assert main(["profile", f"{model_file}:build_with_inputs", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["macs"] == 16 * 16 * 32 * 27 + 16 * 16 * 32 * 32 * 9 + 320
    assert d["per_module"]["b"] == 16 * 16 * 32 * 32 * 9


def test_compile_writes_onnx_report_and_fxp(model_file, tmp_path, capsys):
    onnx_path, report, fxp = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "m.fxp"
    rc = main(["compile", f"{model_file}:build_with_inputs", "--mac-budget", "50%", "-o", str(onnx_path),
               "--report", str(report), "--save", str(fxp), "--groups"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "IN BAND" in out and "kept/total" in out and str(onnx_path) in out
    onnx.checker.check_model(onnx.load(str(onnx_path)))
    d = json.loads(report.read_text())
    assert d["in_band"] and d["macs"] <= d["budget_macs"]
    import fxprune

    assert fxprune.count_macs(fxprune.load(str(fxp)), fxprune.models.resolve_model(
        f"{model_file}:build_with_inputs").example_inputs) == d["macs"]


def test_compile_json_to_stdout(model_file, capsys):
    assert main(["compile", f"{model_file}:build_with_inputs", "--mac-budget", "0.6", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["schema"] == "fxprune.report/1" and d["in_band"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["profile", "torchvision:not_a_model"], "no classification model"),
        (["profile", "what"], "not understood"),
        (["profile", "/nonexistent/x.py:build"], "does not exist"),
        (["compile", "{file}:build", "--mac-budget", "50%"], "--input-shape"),
        (["compile", "{file}:not_a_model", "--mac-budget", "50%"], "must return an nn.Module"),
        (["compile", "{file}:build_with_inputs", "--mac-budget", "lots"], "accepted forms"),
        (["compile", "{file}:build_with_inputs", "--mac-budget", "0.0001"], "smallest model"),
        (["profile", "{file}:build", "--input-shape", "1,a,3"], "not a shape"),
        (["profile", "{file}:build", "--input-shape", "1,5,16,16"], "expected input[1, 5, 16, 16] to have 3 channels"),
    ],
)
def test_errors_are_messages_not_tracebacks(model_file, capsys, argv, message):
    argv = [a.replace("{file}", model_file) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_torchvision_profile(capsys):
    pytest.importorskip("torchvision")
    assert main(["profile", "torchvision:resnet18", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "1.814 GMAC" in out and "(1, 3, 224, 224)" in out
