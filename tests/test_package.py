import subprocess
import sys

import deepcrf
from deepcrf.cli import main


def test_version_and_all():
    assert deepcrf.__version__
    assert "DenseCRF" in deepcrf.__all__


def test_cli_help(capsys):
    assert main([]) == 2
    assert "deepcrf" in capsys.readouterr().out


def test_python_dash_m_help():
    cmd = [sys.executable, "-m", "deepcrf", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0
    assert "usage: deepcrf" in out.stdout


def test_every_public_name_resolves():
    for name in deepcrf.__all__:
        assert getattr(deepcrf, name) is not None, name
    assert callable(deepcrf.dense_crf)
    assert callable(deepcrf.models.create)


def test_dir_lists_the_public_api_only():
    import deepcrf

    names = dir(deepcrf)
    assert names == sorted(deepcrf.__all__)
    assert not {"Any", "annotations", "importlib", "_EXPORTS"} & set(names)
    assert "DenseCRF" in names and "dense_crf" in names and "ops" in names
