"""Per-class contact sheets: the most and least confident selected samples, and the near misses.

Tiles are chosen in one streaming pass over the manifest (a few candidates per class survive each
record batch), then their images are fetched from the shards in one pass that reads only the
wanted samples' bytes, and thumbnails are drawn with Pillow. Each tile is captioned with the
shortened uid and the confidence the selection used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps

from kd3.data.images import decode_image
from kd3.inspect.manifests import ManifestRef, columns_of, iter_batches, prediction_columns
from kd3.inspect.tars import find_samples, image_entry
from kd3.runs import atomic_path

#: (section id, heading) in the order they appear on a sheet
SECTIONS = (("top", "most confident selected"), ("bottom", "least confident selected"),
            ("rejected", "most confident rejected (near misses)"))
UID_CHARS = 8
_COLUMNS = 8
_PAD = 4
_CAPTION = 24
_HEADING = 16
_BACKGROUND = (255, 255, 255)
_PLACEHOLDER = (200, 200, 200)


@dataclass
class Tile:
    uid: str
    conf: float
    section: str
    url: str = ""
    #: "ok", "missing" (not in the shards) or "undecodable"
    status: str = "missing"


@dataclass
class Sheet:
    class_index: int
    class_name: str
    #: the PNG, or None when the class had no sample to show
    path: Optional[Path]
    selected: int
    tiles: list[Tile] = field(default_factory=list)

    def count(self, section: str) -> int:
        return sum(t.section == section for t in self.tiles)


def _reduce(frame: pd.DataFrame, top_n: int, bottom_n: int, rejected_n: int) -> pd.DataFrame:
    """Keep the rows that can still end up on a sheet, whatever the remaining batches hold."""
    sel, rej = frame[frame["selected"]], frame[~frame["selected"]]
    parts = []
    if top_n:
        parts.append(sel.sort_values(["conf", "uid"], ascending=[False, True]).groupby("label").head(top_n))
    if bottom_n:
        # top_n + bottom_n lowest: enough to fill "bottom" without repeating "top" in a small class
        parts.append(sel.sort_values(["conf", "uid"]).groupby("label").head(top_n + bottom_n))
    if rejected_n:
        parts.append(rej.sort_values(["conf", "uid"], ascending=[False, True]).groupby("label").head(rejected_n))
    if not parts:
        return frame.iloc[:0]
    return pd.concat(parts).drop_duplicates("uid")


def pick_tiles(ref: ManifestRef, classes: Sequence[int], top_n: int, bottom_n: int, rejected_n: int,
               by: Optional[str] = None) -> tuple[dict[int, list[Tile]], pd.DataFrame]:
    """Per class: top-N and bottom-N selected by confidence, and the N most confident rejected.

    Returns the tiles per class and the picked rows (with shard/key, for the image lookup).
    """
    label_col, conf_col = prediction_columns(ref.path, by)
    present = set(columns_of(ref.path))
    extra = [c for c in ("url", "shard", "key") if c in present]
    wanted = set(int(k) for k in classes)
    keep: Optional[pd.DataFrame] = None
    for batch in iter_batches(ref.path, ["uid", "selected", label_col, conf_col, *extra]):
        frame = batch.to_pandas().rename(columns={label_col: "label", conf_col: "conf"})
        frame["selected"] = frame["selected"].fillna(False).astype(bool)
        frame = frame[frame["label"].isin(wanted)]
        frame = frame if keep is None else pd.concat([keep, frame], ignore_index=True)
        keep = _reduce(frame, top_n, bottom_n, rejected_n)
    picks: dict[int, list[Tile]] = {int(k): [] for k in classes}
    if keep is None or keep.empty:
        return picks, pd.DataFrame(columns=["uid"])
    keep = keep.assign(label=keep["label"].astype(int))
    for k, group in keep.groupby("label"):
        sel = group[group["selected"]]
        top = sel.sort_values(["conf", "uid"], ascending=[False, True]).head(top_n)
        bottom = sel[~sel["uid"].isin(top["uid"])].sort_values(["conf", "uid"]).head(bottom_n)
        rejected = group[~group["selected"]].sort_values(["conf", "uid"], ascending=[False, True]).head(rejected_n)
        for section, rows in (("top", top), ("bottom", bottom), ("rejected", rejected)):
            for row in rows.itertuples(index=False):
                picks[int(k)].append(Tile(str(row.uid), float(row.conf), section, str(getattr(row, "url", "") or "")))
    shown = {t.uid for tiles in picks.values() for t in tiles}
    return picks, keep[keep["uid"].isin(shown)]


def thumbnail(data: bytes, size: int) -> Image.Image:
    """Encoded image → RGB square of ``size`` (aspect kept, padded); tiny images are enlarged crisply."""
    pixels = decode_image(data).permute(1, 2, 0).numpy()  # kd3's one decoder: 16-bit scaled, not clipped
    img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).convert("RGB")
    resample = Image.Resampling.NEAREST if max(img.size) * 2 <= size else Image.Resampling.LANCZOS
    return ImageOps.pad(img, (size, size), method=resample, color=(40, 40, 40))


def load_thumbnails(shards_dir: Path, rows: pd.DataFrame, size: int) -> dict[str, Optional[Image.Image]]:
    """uid → thumbnail (None when undecodable); uids absent from the shards are left out."""
    wanted = [(str(r.uid), getattr(r, "shard", None), getattr(r, "key", None)) for r in rows.itertuples(index=False)]
    thumbs: dict[str, Optional[Image.Image]] = {}
    for uid, _, _, files in find_samples(shards_dir, wanted):
        entry = image_entry(files)
        try:
            thumbs[uid] = thumbnail(entry[1], size) if entry else None
        except Exception:  # PIL raises many types for corrupt files; the tile says "undecodable"
            thumbs[uid] = None
    return thumbs


def _font(size: int = 10) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans from matplotlib's own data: the same glyphs on every machine, no system fonts needed."""
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (OSError, ImportError):
        return ImageFont.load_default()


def _block_height(n: int, cols: int, size: int) -> int:
    """Pixels under a section heading: rows of tiles, or one text line saying "none"."""
    return -(-n // cols) * (size + _CAPTION + _PAD) if n else _HEADING


def render_sheet(title: str, tiles: Sequence[Tile], thumbs: dict[str, Optional[Image.Image]], size: int,
                 counts: dict[str, int]) -> Image.Image:
    """Sections of tiles under headings; each tile captioned with uid[:8] and confidence."""
    font, heading_font = _font(10), _font(12)
    tile_w = max(size, 60)
    cols = _COLUMNS
    width = _PAD + cols * (tile_w + _PAD)
    layout = [(sid, heading, [t for t in tiles if t.section == sid]) for sid, heading in SECTIONS if counts.get(sid)]
    height = _HEADING + _PAD
    for _, _, items in layout:
        height += _HEADING + _block_height(len(items), cols, size)
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((_PAD, 2), title, fill=(0, 0, 0), font=heading_font)
    y = _HEADING + _PAD
    for _, heading, items in layout:
        draw.text((_PAD, y + 1), f"{heading} ({len(items)})", fill=(60, 60, 160), font=font)
        y += _HEADING
        if not items:
            draw.text((_PAD, y), "none", fill=(120, 120, 120), font=font)
        for i, tile in enumerate(items):
            x = _PAD + (i % cols) * (tile_w + _PAD)
            ty = y + (i // cols) * (size + _CAPTION + _PAD)
            image = thumbs.get(tile.uid)
            left = x + (tile_w - size) // 2
            if image is not None:
                sheet.paste(image, (left, ty))
            else:
                draw.rectangle([left, ty, left + size - 1, ty + size - 1], fill=_PLACEHOLDER)
                draw.text((left + 3, ty + size // 2 - 6), tile.status, fill=(90, 0, 0), font=font)
            draw.text((x, ty + size + 1), tile.uid[:UID_CHARS], fill=(0, 0, 0), font=font)
            draw.text((x, ty + size + 12), f"{tile.conf:.3f}", fill=(80, 80, 80), font=font)
        y += _block_height(len(items), cols, size)
    return sheet


def build_sheets(ref: ManifestRef, shards_dir: Path, out_dir: Path, class_names: Sequence[str],
                 classes: Sequence[int], selected_per_class: Sequence[int], top_n: int, bottom_n: int,
                 rejected_n: int, size: int, by: Optional[str] = None) -> list[Sheet]:
    """Write ``out_dir/class_KKK.png`` for each class with something to show; one Sheet per class."""
    picks, rows = pick_tiles(ref, classes, top_n, bottom_n, rejected_n, by)
    thumbs = load_thumbnails(shards_dir, rows, size) if len(rows) else {}
    sheets = []
    for k in classes:
        tiles = picks.get(k, [])
        for tile in tiles:
            found = tile.uid in thumbs
            tile.status = "missing" if not found else "ok" if thumbs[tile.uid] is not None else "undecodable"
        sheet = Sheet(k, class_names[k], None, int(selected_per_class[k]), tiles)
        if tiles:
            counts = {"top": top_n, "bottom": bottom_n, "rejected": rejected_n}
            title = f"class {class_names[k]} — {sheet.selected} selected ({ref.name})"
            image = render_sheet(title, tiles, thumbs, size, counts)
            sheet.path = Path(out_dir) / f"class_{k:03d}.png"
            with atomic_path(sheet.path) as tmp:
                image.save(tmp, format="PNG")
        sheets.append(sheet)
    return sheets
