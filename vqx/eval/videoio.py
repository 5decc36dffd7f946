"""Reading and writing the videos and images that evaluation compares and shows.

mp4s are written through imageio-ffmpeg (H.264, yuv420p) or, where that is missing, OpenCV (mp4v), always
atomically. Frames are made displayable first: tiny videos are upscaled (nearest, integer factor) and
sizes padded to multiples of 16, which every H.264 encoder and player accepts.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import Fault, UserError
from ..io import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".gif")
MIN_DISPLAY_SIDE = 128
BLOCK = 16


def to_uint8(video: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8, rounding to nearest (what a PNG of the frame would hold)."""
    return np.round(np.clip(video, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_float(video: np.ndarray) -> np.ndarray:
    return video.astype(np.float32) / 255.0


def side_by_side(ref: np.ndarray, test: np.ndarray, gain: float) -> np.ndarray:
    """uint8 [F, H, 3W, 3]: reference | test | |reference - test| * gain."""
    diff = np.abs(ref.astype(np.int16) - test.astype(np.int16)).astype(np.float32) * gain
    return np.concatenate([ref, test, np.clip(np.round(diff), 0, 255).astype(np.uint8)], axis=2)


def frame_strip(ref: np.ndarray, test: np.ndarray, gain: float) -> np.ndarray:
    """uint8 [3H, 3W, 3]: the first, middle and last frames of `side_by_side`, one above the other (a still that
    shows at a glance where the quantized video departs from the reference)."""
    panels = side_by_side(ref, test, gain)
    picks = sorted({0, len(panels) // 2, len(panels) - 1})
    return np.ascontiguousarray(np.concatenate([panels[k] for k in picks], axis=0))


def write_png(path: str | os.PathLike, image: np.ndarray) -> str:
    """An RGB uint8 image as a PNG, atomically."""
    from PIL import Image

    with atomic_path(Path(path)) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return str(path)


def displayable(video: np.ndarray) -> np.ndarray:
    """Upscale small videos (nearest) so the short side is >= MIN_DISPLAY_SIDE, pad to multiples of 16."""
    h, w = video.shape[1:3]
    k = max(1, -(-MIN_DISPLAY_SIDE // min(h, w)))
    if k > 1:
        video = video.repeat(k, axis=1).repeat(k, axis=2)
    h, w = video.shape[1:3]
    ph, pw = (-h) % BLOCK, (-w) % BLOCK
    if ph or pw:
        video = np.pad(video, ((0, 0), (0, ph), (0, pw), (0, 0)))
    return np.ascontiguousarray(video)


def video_library() -> str | None:
    """'imageio-ffmpeg', 'opencv' or None."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return "imageio-ffmpeg"
    except (ImportError, RuntimeError):
        pass
    try:
        import cv2  # noqa: F401

        return "opencv"
    except ImportError:
        return None


NO_VIDEO_LIBRARY = "cannot write or read mp4: neither imageio-ffmpeg nor OpenCV is usable -- pip install imageio-ffmpeg"


def write_mp4(path: str | os.PathLike, video: np.ndarray, fps: int = 16) -> str:
    """Write uint8 [F, H, W, 3] as an mp4; returns the library used (imageio-ffmpeg or opencv)."""
    frames = displayable(video)
    h, w = frames.shape[1:3]
    library = video_library()
    # encoders pick the container from the temporary file's suffix; the videos are meant to be shared
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        if library == "imageio-ffmpeg":
            import imageio_ffmpeg

            writer = imageio_ffmpeg.write_frames(str(tmp), (w, h), fps=fps, codec="libx264", quality=None,
                                                 macro_block_size=1, output_params=["-crf", "17"])
            writer.send(None)
            for f in frames:
                writer.send(f.tobytes())
            writer.close()
        elif library == "opencv":
            import cv2

            writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            if not writer.isOpened():
                raise Fault(f"OpenCV could not open an mp4 writer for {path}")
            for f in frames:
                writer.write(np.ascontiguousarray(f[:, :, ::-1]))  # OpenCV wants BGR
            writer.release()
        else:
            raise UserError(NO_VIDEO_LIBRARY)
        if tmp.stat().st_size == 0:
            raise Fault(f"the {library} encoder wrote an empty file for {path}")
    return library


def read_video(path: Path) -> np.ndarray:
    """uint8 [F, H, W, 3] (RGB)."""
    library = video_library()
    try:
        if library == "imageio-ffmpeg":
            import imageio_ffmpeg

            gen = imageio_ffmpeg.read_frames(str(path))
            w, h = next(gen)["size"]
            frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in gen]
        elif library == "opencv":
            import cv2

            cap = cv2.VideoCapture(str(path))
            frames = []
            while True:
                ok, f = cap.read()
                if not ok:
                    break
                frames.append(f[:, :, ::-1])
            cap.release()
        else:
            raise UserError(NO_VIDEO_LIBRARY)
    except (RuntimeError, OSError, StopIteration, ValueError) as e:
        raise UserError(f"cannot read video {path}: {_first_line(e)}") from None
    if not frames:
        raise UserError(f"cannot read video {path}: no frames decoded (not a video, or an empty one)")
    return np.stack(frames)


def read_image(path: Path) -> np.ndarray:
    """uint8 [1, H, W, 3] (RGB, alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)[None]
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {_first_line(e)}") from None


def load_media(path: Path) -> np.ndarray:
    """An image (one frame) or a video as float32 [F, H, W, 3] in [0, 1]."""
    if not path.exists():
        raise UserError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return to_float(read_image(path))
    if suffix in VIDEO_SUFFIXES:
        return to_float(read_video(path))
    raise UserError(f"{path}: unknown media type {suffix or '(no suffix)'!r}; images: {' '.join(IMAGE_SUFFIXES)}; "
                    f"videos: {' '.join(VIDEO_SUFFIXES)}")


def media_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
