import numpy as np
import pytest
from PIL import Image

from deepcrf.data.palette import (
    colorize,
    read_image,
    read_label_png,
    voc_palette,
    write_label_png,
)


def test_voc_palette_known_colours():
    # Colours of the VOC development kit's colour map (VOCdevkit/VOCcode/VOClabelcolormap.m).
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]  # aeroplane
    assert palette[2].tolist() == [0, 128, 0]  # bicycle
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[20].tolist() == [0, 64, 128]  # tvmonitor
    assert palette[255].tolist() == [224, 224, 192]  # void
    assert len({tuple(c) for c in palette}) == 256


def test_label_png_round_trip(tmp_path):
    labels = np.random.default_rng(0).integers(0, 21, size=(7, 9)).astype(np.uint8)
    labels[0, :] = 255
    path = tmp_path / "sub" / "a.png"
    write_label_png(path, labels)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert im.getpalette()[3 * 15 : 3 * 16] == [192, 128, 128]
    np.testing.assert_array_equal(read_label_png(path), labels)
    np.testing.assert_array_equal(colorize(labels)[0, 0], [224, 224, 192])
    assert not list(tmp_path.glob("sub/.*.tmp"))  # atomic write leaves no temp file


def test_write_label_png_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"labels must be \(H, W\)"):
        write_label_png(tmp_path / "a.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(TypeError, match="labels must be integers"):
        write_label_png(tmp_path / "a.png", np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 255\]"):
        write_label_png(tmp_path / "a.png", np.full((2, 2), 256))
    assert not (tmp_path / "a.png").exists()


def test_read_label_png_rejects_rgb_and_corrupt(tmp_path):
    Image.new("RGB", (4, 3), (128, 0, 0)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png must be a palette \(P\) or greyscale"):
        read_label_png(tmp_path / "rgb.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"cannot read label image .*bad\.png"):
        read_label_png(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="label image not found"):
        read_label_png(tmp_path / "none.png")


def test_read_image_converts_to_rgb(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "grey.png")
    Image.new("RGBA", (5, 4), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    grey = read_image(tmp_path / "grey.png")
    rgba = read_image(tmp_path / "rgba.png")
    assert grey.shape == (4, 5, 3) and (grey == 77).all()
    assert rgba.shape == (4, 5, 3) and rgba[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match="image not found"):
        read_image(tmp_path / "none.jpg")
