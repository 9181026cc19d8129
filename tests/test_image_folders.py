"""Image folders as users have them: every file's fate, in memory and streamed, against Pillow.

One generated messy folder holds nested sub-folders, hidden files and folders, WebP (one named
.jpg), TIFF, a dangling link, EXIF-rotated JPEGs (orientations 2-8), palette BMP and PNG,
transparent PNG and WebP, a name that is not UTF-8 and damaged files. Each file is either used,
with the pixels Pillow shows for it (`ImageOps.exif_transpose`, `convert("RGB")`, transparency
composited on white), or listed as skipped with its reason.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from conftest import TINY_FOLDER_RUN, flag_error, run_cli
from PIL import Image, ImageOps

from tlloop.cli.config import DataConfig
from tlloop.cli.data import load_data
from tlloop.config import ConfigError
from tlloop.data.images import read_image, scan_bytes
from tlloop.data.storage import skipped_unreadable
from tlloop.data.streaming import EncodedImages

SIZE = 12  # images are SIZE x SIZE: read at --image_size=SIZE they are only cast, not resized


def _pixels(seed: int, alpha: bool = False) -> np.ndarray:
    """Four quadrants of distinct colours with a gradient: any turn or mirror shows."""
    rng = np.random.default_rng(seed)
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    half = SIZE // 2
    for r, c in [(0, 0), (0, half), (half, 0), (half, half)]:
        image[r : r + half, c : c + half] = rng.integers(20, 236, 3)
    image[0, :, 0] = np.linspace(0, 255, SIZE).astype(np.uint8)  # the top row: a ramp
    if alpha:
        opacity = np.tile(np.linspace(0, 255, SIZE).astype(np.uint8), (SIZE, 1))[..., None]
        return np.concatenate([image, opacity], axis=-1)
    return image


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def _jpeg(seed: int, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0110] = "tlloop test"  # a tag before Orientation, as cameras write them
    exif[0x0112] = orientation
    return _encode(Image.fromarray(_pixels(seed)), "JPEG", quality=95, exif=exif)


def _files() -> dict[str, bytes]:
    """Relative path: bytes, of the files that should be read, by class."""
    files = {}
    for label, name in enumerate(("cat", "dog")):
        seed = 10 * label
        files[f"{name}/plain.png"] = _encode(Image.fromarray(_pixels(seed)), "PNG")
        files[f"{name}/deep/er/nested.png"] = _encode(Image.fromarray(_pixels(seed + 1)), "PNG")
        files[f"{name}/lossless.webp"] = _encode(
            Image.fromarray(_pixels(seed + 2)), "WEBP", lossless=True
        )
        files[f"{name}/palette.bmp"] = _encode(
            Image.fromarray(_pixels(seed + 3)).convert("P"), "BMP"
        )
        files[f"{name}/palette.png"] = _encode(
            Image.fromarray(_pixels(seed + 4)).convert("P"), "PNG"
        )
        files[f"{name}/rgba.png"] = _encode(Image.fromarray(_pixels(seed + 5, alpha=True)), "PNG")
    for orientation in range(1, 9):
        name = ("cat", "dog")[orientation % 2]
        files[f"{name}/photo{orientation}.jpg"] = _jpeg(20 + orientation, orientation)
    files["cat/webp-named.jpg"] = _encode(Image.fromarray(_pixels(31)), "WEBP", lossless=True)
    files["dog/rgba.webp"] = _encode(
        Image.fromarray(_pixels(32, alpha=True)), "WEBP", lossless=True
    )
    palette = Image.fromarray(_pixels(33)).convert("P")
    files["dog/see-through.png"] = _encode(palette, "PNG", transparency=0)
    return files


NOT_UTF8 = b"caf\xe9.png"  # Latin-1 e-acute: no UTF-8 name


def _reference(data: bytes) -> np.ndarray:
    """The image as Pillow shows it: turned as its EXIF says, transparency on white."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """(root, {path: bytes} of the files read, {path: reason fragment} of those skipped)."""
    root = tmp_path_factory.mktemp("messy") / "images"
    used = {str(root / rel): data for rel, data in _files().items()}
    for path, data in used.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            file.write(data)
    odd = os.path.join(os.fsencode(root / "dog"), NOT_UTF8)
    with open(odd, "wb") as file:
        file.write(_encode(Image.fromarray(_pixels(40)), "PNG"))
    used[os.fsdecode(odd)] = _encode(Image.fromarray(_pixels(40)), "PNG")
    tiff = _encode(Image.fromarray(_pixels(41)), "TIFF")
    skipped = {
        str(root / "cat" / "scan.tif"): "TIFF: TensorFlow does not decode it",
        str(root / "dog" / "tiff-named.jpg"): "unreadable: a TIFF image",
        str(root / "cat" / "gone.jpg"): "a link to nothing",
        str(root / "cat" / "notes.txt"): "not read: extension .txt",
        str(root / "dog" / "cut.png"): "unreadable: ",
        str(root / "dog" / "one-bit.bmp"): "unreadable: a 1-bit BMP",
        str(root / "README.md"): "beside the class folders",
    }
    (root / "cat" / "scan.tif").write_bytes(tiff)
    (root / "dog" / "tiff-named.jpg").write_bytes(tiff)
    os.symlink(root / "cat" / "deleted.jpg", root / "cat" / "gone.jpg")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "cut.png").write_bytes(used[str(root / "dog" / "plain.png")][:60])
    one_bit = Image.fromarray(_pixels(42)).convert("1")
    (root / "dog" / "one-bit.bmp").write_bytes(_encode(one_bit, "BMP"))
    (root / "README.md").write_text("my photos")
    # Hidden: ignored, never a class, never listed (as Keras).
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "t.png").write_bytes(used[str(root / "cat" / "plain.png")])
    (root / "cat" / ".hidden.jpg").write_bytes(b"junk")
    (root / "dog" / ".cache").mkdir()
    (root / "dog" / ".cache" / "x.png").write_bytes(b"junk")
    return root, used, skipped


def _config(root, **kw) -> DataConfig:
    settings = dict(image_size=SIZE, batch_size=4, val_split=0.3, bad_images="skip")
    return DataConfig(dataset="folder", data_dir=str(root), **{**settings, **kw})


def _by_file(examples) -> dict[str, np.ndarray]:
    """Streamed examples' decoded pixels by file."""
    images = [x.numpy() for x, _ in examples.ordered()]
    return {
        os.fsdecode(path): image for path, image in zip(examples.reader.items, images, strict=True)
    }


def test_every_file_is_read_as_pillow_shows_it_or_skipped_with_its_reason(messy):
    root, used, skipped = messy
    streamed = load_data(_config(root, data_memory="0"))
    assert streamed.class_names == ("cat", "dog")
    pixels = {**_by_file(streamed.train_examples), **_by_file(streamed.eval_examples)}
    assert sorted(pixels) == sorted(used)
    for path, data in used.items():
        reference = _reference(data).astype(int)
        error = np.abs(pixels[path].astype(int) - reference)
        # JPEG: two decoders' rounding; a wrong turn or mirror is off by tens on average.
        limit = 3.0 if data.startswith(b"\xff\xd8") else 0.5
        assert pixels[path].shape == reference.shape and error.mean() <= limit, (path, error)
    # Every file not read is listed with its reason; hidden ones are not files of the run.
    assert sorted(streamed.skipped_files) == sorted(skipped)
    for path, why in skipped.items():
        assert streamed.skipped_files[path].startswith(why), (path, streamed.skipped_files[path])
    assert not any("/." in path for path in streamed.skipped_files)

    # In memory: the very same batches, bit for bit.
    memory = load_data(_config(root))
    assert memory.storage["train"].startswith("memory")
    assert dict(memory.skipped_files) == dict(streamed.skipped_files)
    for a, b in zip(memory.eval, streamed.eval, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    for a, b in zip(memory.train.take(4), streamed.train.take(4), strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_bad_image_is_refused_naming_it_with_its_reason_and_counted(messy):
    root, _, _ = messy
    with pytest.raises(ConfigError) as refused:
        load_data(_config(root, bad_images="fail"))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("image file ")
    assert "cannot be read or decoded" in message and "(2 more unreadable images)" in message


def test_unreadable_images_are_counted_over_both_splits(tmp_path):
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            (root / name / f"{i}.png").write_bytes(_encode(Image.fromarray(_pixels(i)), "PNG"))
    bad = [root / "a" / f"{i}.png" for i in range(10)[::2]]  # five: in either split
    for path in bad:
        path.write_bytes(b"not an image")
    for memory in ("auto", "0"):
        with flag_error(r"\(4 more unreadable images\)$"):
            load_data(_config(root, bad_images="fail", data_memory=memory, val_split=0.5))
    data = load_data(_config(root, val_split=0.5))
    assert sorted(skipped_unreadable(data.skipped_files)) == sorted(str(p) for p in bad)


def test_a_class_of_one_image_is_refused_in_one_line(tmp_path):
    root = tmp_path / "images"
    (root / "only").mkdir(parents=True)
    (root / "only" / "0.png").write_bytes(_encode(Image.fromarray(_pixels(0)), "PNG"))
    with flag_error(r"^--data_dir='.*images': class 'only' has 1 example"):
        load_data(_config(root))
    (root / "many").mkdir()
    for i in range(5):
        (root / "many" / f"{i}.png").write_bytes(_encode(Image.fromarray(_pixels(i)), "PNG"))
    with flag_error(r"class 'only' has 1 example\(s\), too few"):
        load_data(_config(root))
    # Left out by --classes: no class of the run is short of an example.
    (root / "more").mkdir()
    for i in range(5):
        (root / "more" / f"{i}.png").write_bytes(_encode(Image.fromarray(_pixels(i)), "PNG"))
    data = load_data(_config(root, classes=("many", "more")))
    assert data.class_names == ("many", "more") and data.train_size + data.eval_size == 10


def test_one_file_is_read_as_training_reads_it(messy):
    root, _, _ = messy
    for name in ("cat/photo6.jpg", "cat/palette.bmp", "dog/rgba.png"):
        path = str(root / name)
        assert np.array_equal(read_image(path), _by_file_read(root, path))
    odd = os.fsdecode(os.path.join(os.fsencode(root / "dog"), NOT_UTF8))
    assert read_image(odd).shape == (SIZE, SIZE, 3)
    with flag_error(r"^image file '.*tiff-named.jpg': .*a TIFF image"):
        read_image(str(root / "dog" / "tiff-named.jpg"))


def _by_file_read(root, path) -> np.ndarray:
    data = load_data(_config(root, data_memory="0"))
    return {**_by_file(data.train_examples), **_by_file(data.eval_examples)}[path]


def test_the_scan_finds_the_form_in_a_few_bytes():
    assert scan_bytes(_jpeg(0, 6)) == (6, "")
    assert scan_bytes(_jpeg(0, 1)) == (0, "")  # as stored: as with no tag
    assert scan_bytes(b"") == (0, "an empty file")
    # Big-endian EXIF after a JFIF segment, as some cameras write it.
    tiff = b"MM\0*" + (8).to_bytes(4, "big") + (1).to_bytes(2, "big")
    tiff += (0x0112).to_bytes(2, "big") + (3).to_bytes(2, "big") + (1).to_bytes(4, "big")
    tiff += (8).to_bytes(2, "big") + bytes(2) + bytes(4)
    app1 = b"\xff\xe1" + (2 + 6 + len(tiff)).to_bytes(2, "big") + b"Exif\0\0" + tiff
    jfif = b"\xff\xe0" + (16).to_bytes(2, "big") + b"JFIF\0" + bytes(9)
    assert scan_bytes(b"\xff\xd8" + jfif + app1 + b"\xff\xda") == (8, "")
    form, problem = scan_bytes(_encode(Image.fromarray(_pixels(0, alpha=True)), "PNG"))
    assert form & 16 and not problem


def test_a_run_lists_every_file_it_left_out_with_its_reason(messy, tmp_path):
    root, used, skipped = messy
    workdir = tmp_path / "run"
    done = run_cli(
        *TINY_FOLDER_RUN,
        f"--data_dir={root}",
        "--bad_images=skip",
        "--data_memory=0",
        f"--data_cache={tmp_path / 'cache'}",  # its file names hash every path, bytes too
        f"--workdir={workdir}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["class_names"] == ["cat", "dog"]
    assert results["train_size"] + results["eval_size"] == len(used)
    assert sorted(results["skipped_images"]) == sorted(results["skipped_reasons"])
    assert sorted(results["skipped_reasons"]) == sorted(skipped)
    assert "with transparency composited on white" in done.stderr


def test_files_given_from_python_are_turned_and_composited_as_a_folders_are(messy):
    root, used, _ = messy
    names = ["cat/photo6.jpg", "cat/palette.bmp", "dog/rgba.png"]
    paths = [str(root / name) for name in names]
    examples = EncodedImages.from_files(paths, [0, 0, 1], image_size=SIZE)
    pixels = _by_file(examples)
    for name, path in zip(names, paths, strict=True):
        reference = _reference(used[path]).astype(int)
        limit = 3.0 if name.endswith(".jpg") else 0.5
        assert np.abs(pixels[path].astype(int) - reference).mean() <= limit, name
