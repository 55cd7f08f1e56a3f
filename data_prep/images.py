"""Images in rows: one image per `<image>` placeholder or image part, LLaMA-Factory's markers turned into image parts,
and each image checked (a file under the data folder, or bytes in the row) and, where asked, decoded."""

from pathlib import Path

from .messages import RowError, require_list, require_str, text_of

LITERAL_IMAGE_NOTE = "a literal '<image>' in a row without image files: read as text, not as an image slot"
_IMAGE_OK: dict[str, str | None] = {}  # path -> None if it decodes, else the error; images repeat across rows


def has_literal_image_marker(record: dict) -> bool:
    """A text row (no images) whose text holds `<image>`: scraped text, read as text, worth a warning."""
    if record.get("images"):
        return False
    columns = ("messages", "prompt", "chosen", "rejected", "completion")
    return any(isinstance(m, dict) and "<image>" in text_of(m.get("content"))
               for c in columns if isinstance(record.get(c), list) for m in record[c])


def check_image_slots(conversations: list[list[dict]], images: list | None):
    """As many images as placeholders (`{"type": "image"}` parts or `<image>` markers), when there are any.

    No placeholder at all is fine: TRL then puts the images at the start of the first user turn. No image at all is
    a text row: a literal `<image>` in scraped text is text there, not a slot (callers warn about it).
    """
    slots = markers = 0
    for messages in conversations:
        for message in messages:
            content = message["content"]
            if isinstance(content, list):
                slots += sum(1 for part in content if part.get("type") == "image")
            else:
                markers += content.count("<image>")
    slots += markers if images else 0
    if slots and slots != len(images or []):
        raise RowError("images", f"has {len(images or [])} file(s) for {slots} image placeholder(s) in the text",
                       "one image per placeholder")


def image_markers_to_parts(messages: list[dict]) -> list[dict]:
    """LLaMA-Factory's `<image>` text markers as TRL's typed parts, so TRL does not add a second placeholder."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str) and "<image>" in content:
            pieces = content.split("<image>")
            parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
            for piece in pieces[1:]:
                parts += [{"type": "image"}] + ([{"type": "text", "text": piece}] if piece else [])
            message = {**message, "content": parts}
        out.append(message)
    return out


def check_images(images, base_dir: Path, decode: bool, field: str = "images",
                 embedded: bool = False) -> list | None:
    """Image paths that exist (relative ones resolved from the data file's folder) and, if `decode`, open with PIL.

    With `embedded` (the data jobs pass it), an image may also be given as bytes (the `datasets.Image` feature's
    `{"bytes", "path"}` form with bytes): it is returned as `{"bytes": ...}` after the same decode check. Without it,
    bytes are an error: the caller takes image files only."""
    if images is None or images == []:
        return None
    if isinstance(images, (str, dict)):
        images = [images]
    images = require_list(images, field, "a list of image file paths")
    out = []
    for i, image in enumerate(images):
        if isinstance(image, dict) and image.get("bytes") is not None:
            out.append(_embedded_image(image["bytes"], f"{field}[{i}]", decode, embedded))
            continue
        if isinstance(image, dict) and isinstance(image.get("path"), str):
            image = image["path"]  # the `datasets.Image` feature's {"path", "bytes"} form
        path_text = require_str(image, f"{field}[{i}]", "an image file path")
        path = Path(path_text).expanduser()
        path = path if path.is_absolute() else (base_dir / path)
        if not path.is_file():
            raise RowError(f"{field}[{i}]", f"file not found: {path}", "an existing image file "
                           "(relative paths are resolved from the data file's folder)")
        if decode:
            error = _IMAGE_OK.get(str(path), "?")
            if error == "?":
                error = _IMAGE_OK[str(path)] = _decode_error(path)
            if error:
                raise RowError(f"{field}[{i}]", f"does not decode as an image ({error})", "a PNG/JPEG/... file")
        out.append(str(path.resolve()))
    return out


def _embedded_image(data, field: str, decode: bool, embedded: bool) -> dict:
    if not embedded:
        raise RowError(field, "holds image bytes, not a file path", "a file path (this reader takes image files only; "
                       "the data jobs, `Options(embedded_images=True)`, also take embedded images)")
    if not isinstance(data, (bytes, bytearray)):
        raise RowError(f"{field}.bytes", f"is a {type(data).__name__}", "the bytes of a PNG/JPEG/... image (JSON has no "
                       "bytes: embed images through a parquet file, e.g. a datasets Image column, or give file paths)")
    if decode:
        import io

        error = _decode_error(io.BytesIO(data))
        if error:
            raise RowError(field, f"does not decode as an image ({error})", "a PNG/JPEG/... image")
    return {"bytes": bytes(data)}


def embed_image(image) -> dict:
    """An image `check_images` returned as `{"bytes": ...}`: a file path is read, bytes stay as they are."""
    return image if isinstance(image, dict) else {"bytes": Path(image).read_bytes()}


def _decode_error(path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for a bad file
        return f"{type(exc).__name__}: {exc}"
    return None
