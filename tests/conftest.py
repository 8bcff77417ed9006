from pathlib import Path

import pytest
import torch

# ../shared beside the checkout (read-only golden outputs of the reference dense CRF).
SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE_CASE = SHARED / "reference" / "densecrf_voc_case.npz"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def devices():
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out.append(torch.device("cuda"))
    return out


@pytest.fixture
def fake_voc(tmp_path):
    """A seeded 3-train / 2-val fake VOC tree (tests/fakevoc.py); returns its VOC2012 directory."""
    from tests.fakevoc import make_fake_voc

    return make_fake_voc(tmp_path)
