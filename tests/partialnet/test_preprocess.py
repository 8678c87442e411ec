"""The preprocessing contract on real image files in several modes."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from partialnet import ImageError, Preprocess
from partialnet.preprocess import load_image, preprocess_files, preprocess_image, resize_shorter

PP = Preprocess(input_size=64)  # resize 71, crop 64
MEAN = np.array(PP.mean, np.float32)[:, None, None]
STD = np.array(PP.std, np.float32)[:, None, None]


def _normalized(rgb) -> np.ndarray:
    return (np.asarray(rgb, np.float32)[:, None, None] / 255.0 - MEAN) / STD


def test_resize_geometry_follows_shorter_side_and_truncates():
    assert resize_shorter(Image.new("RGB", (300, 200)), 71).size == (106, 71)  # int(71 * 300 / 200) = 106
    assert resize_shorter(Image.new("RGB", (200, 333)), 71).size == (71, 118)
    assert Preprocess(224).resize_size == 248 and Preprocess(256).resize_size == 284


def test_solid_color_jpeg_png_webp_bmp(tmp_path):
    color = (200, 100, 50)
    for ext, kw in ((".png", {}), (".bmp", {}), (".webp", {"lossless": True}), (".jpg", {"quality": 100})):
        path = tmp_path / f"solid{ext}"
        Image.new("RGB", (90, 120), color).save(path, **kw)
        x = preprocess_files([path], PP)
        assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32
        tol = 2.5 / 255 / min(PP.std) if ext == ".jpg" else 1e-6
        assert np.abs(x[0] - _normalized(color)).max() <= tol, ext


def test_center_crop_is_centered(tmp_path):
    # A 142 x 71 image keeps its size (shorter side already 71); the crop takes columns 39..102.
    arr = np.zeros((71, 142, 3), np.uint8)
    arr[:, :, 0] = np.arange(142, dtype=np.uint8)[None, :]
    path = tmp_path / "ramp.png"
    Image.fromarray(arr).save(path)
    x = preprocess_files([path], PP)[0]
    red = x[0] * PP.std[0] + PP.mean[0]
    assert np.allclose(red[0] * 255, np.arange(39, 103), atol=1e-3)


def test_matches_a_direct_pillow_pipeline(tmp_path, rng):
    arr = rng.integers(0, 256, size=(150, 110, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    ref = img.resize((71, int(71 * 150 / 110)), Image.Resampling.BICUBIC)
    top = int(round((ref.size[1] - 64) / 2.0))
    left = int(round((ref.size[0] - 64) / 2.0))
    ref = np.asarray(ref.crop((left, top, left + 64, top + 64)), np.float32).transpose(2, 0, 1) / 255.0
    ref = (ref - MEAN) / STD
    assert np.array_equal(preprocess_image(img, PP), ref.astype(np.float32))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_modes_are_converted_to_rgb(tmp_path, mode):
    base = Image.new("RGB", (80, 80), (120, 120, 120))
    ext = ".jpg" if mode == "CMYK" else ".png"
    if mode == "I;16":
        img = Image.fromarray(np.full((80, 80), 120 * 257, np.uint16))
    elif mode == "CMYK":
        img = base.convert("CMYK")
    elif mode == "P":
        img = base.convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        img = base.convert(mode)
    path = tmp_path / f"img_{mode.replace(';', '')}{ext}"
    img.save(path, **({"quality": 100} if ext == ".jpg" else {}))
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    x = preprocess_files([path], PP)[0]
    expected = (255, 255, 255) if mode == "1" else (120, 120, 120)  # 1-bit dithers mid grey to white here
    if mode != "1":
        assert np.abs(x - _normalized(expected)).max() <= 3 / 255 / min(PP.std), mode
    assert np.isfinite(x).all()


def test_alpha_is_dropped_like_training(tmp_path):
    img = Image.new("RGBA", (80, 80), (10, 200, 30, 0))  # fully transparent: colour is still used
    path = tmp_path / "alpha.png"
    img.save(path)
    assert np.abs(preprocess_files([path], PP)[0] - _normalized((10, 200, 30))).max() < 1e-6


def test_unreadable_files_name_the_file(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="notes.jpg is not an image"):
        load_image(text)
    good = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(good)
    good.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(ImageError, match="cut.png could not be decoded"):
        load_image(good)
    with pytest.raises(ImageError, match="missing.png does not exist"):
        load_image(tmp_path / "missing.png")
