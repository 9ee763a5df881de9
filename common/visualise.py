"""Pictures of predictions: the predicted and the ground-truth mask outlined on the image, and
a model's own panels (its `vis_panels`: the paper's figures) as heat maps, under the sentence
(`eval.py --save-vis`, `eval.py --image`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Mask colours that no synthetic shape has (common.shapes.COLOURS: red, green, blue, yellow,
# purple), so that a mask stays visible on the very shape it covers.
PRED_COLOUR = np.array([0, 230, 255])  # cyan
GT_COLOUR = np.array([255, 0, 255])  # magenta
PANEL_WIDTH = 256  # pixels; outlines are drawn at this size, so they look alike for any image
OUTLINE_PX, FILL_ALPHA = 2, 0.25  # a solid edge says where the mask is, a light fill what it covers
HEADER_PX, TITLE_PX, LEGEND_BOX = 32, 14, 10  # header (sentence, legend) and panel-title heights
SCALE_PX = 60  # the width of the heat maps' colour scale


def to_width(array: np.ndarray, width: int, resample) -> np.ndarray:
    """An image (H, W, 3) uint8 or a mask (H, W) bool resized to `width`, keeping its aspect."""
    height = max(1, round(array.shape[0] * width / array.shape[1]))
    return np.asarray(Image.fromarray(array).resize((width, height), resample))


def edge(mask: np.ndarray, px: int) -> np.ndarray:
    """The pixels of `mask` within `px` pixels of its border (4-neighbour erosion; the image's
    border counts as outside, so a mask touching it is outlined there too)."""
    inner = mask
    for _ in range(px):
        p = np.pad(inner, 1)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def overlay(image: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """`mask` on `image`: a light fill of `colour` and a solid OUTLINE_PX outline of it."""
    out = image.astype(np.float32).copy()
    out[mask] = (1 - FILL_ALPHA) * out[mask] + FILL_ALPHA * colour
    out[edge(mask, OUTLINE_PX)] = colour
    return out.astype(np.uint8)


def heatmap(image: np.ndarray, value: np.ndarray) -> np.ndarray:
    """A map in [0, 1] of any size, resized onto the image and blended as a blue-red heat map."""
    v = np.asarray(Image.fromarray((np.clip(value, 0, 1) * 255).astype(np.uint8))
                   .resize(image.shape[1::-1], Image.BILINEAR), dtype=np.float32)[:, :, None] / 255
    heat = np.concatenate([v, 0.2 * np.ones_like(v), 1 - v], 2) * 255
    return (0.45 * image + 0.55 * heat).astype(np.uint8)


def compose(panels: list[tuple[str, np.ndarray]], header: str,
            legend: Sequence[tuple[str, np.ndarray]] = (), width: int = PANEL_WIDTH,
            scale: bool = False) -> Image.Image:
    """Panels (title, uint8 image) side by side, wrapping every 6, under a header: one line of
    text and a legend line of (label, colour) boxes, then (scale) the heat maps' colour scale."""
    font = ImageFont.load_default()
    tiles = []
    for title, img in panels:
        im = Image.fromarray(img)
        im = im.resize((width, max(1, round(im.height * width / im.width))), Image.BILINEAR)
        tile = Image.new("RGB", (width, im.height + TITLE_PX), "white")
        tile.paste(im, (0, TITLE_PX))
        ImageDraw.Draw(tile).text((2, 1), title[:42], fill="black", font=font)
        tiles.append(tile)
    cols = min(6, len(tiles))
    rows = -(-len(tiles) // cols)
    th = max(t.height for t in tiles)
    sheet = Image.new("RGB", (cols * width, rows * th + HEADER_PX), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 3), header[:160], fill="black", font=font)
    x = 2
    for label, colour in legend:  # a box of the colour, then its label
        draw.rectangle((x, 18, x + LEGEND_BOX, 18 + LEGEND_BOX), fill=tuple(int(c) for c in colour),
                       outline="black")
        draw.text((x + LEGEND_BOX + 4, 17), label, fill="black", font=font)
        x += LEGEND_BOX + 12 + round(draw.textlength(label, font=font))
    if scale:  # heatmap's colours from 0 to 1, as a bar between its two ends
        bar = heatmap(np.zeros((LEGEND_BOX, SCALE_PX, 3), np.uint8),
                      np.tile(np.linspace(0, 1, SCALE_PX), (LEGEND_BOX, 1)))
        draw.text((x, 17), "heat 0", fill="black", font=font)
        x += 4 + round(draw.textlength("heat 0", font=font))
        sheet.paste(Image.fromarray(bar), (x, 18))
        draw.text((x + SCALE_PX + 4, 17), "1", fill="black", font=font)
    for k, t in enumerate(tiles):
        sheet.paste(t, ((k % cols) * width, HEADER_PX + (k // cols) * th))
    return sheet


def visual(image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None, sentence: str,
           extra: list[tuple[str, torch.Tensor]], iou: float | None = None) -> Image.Image:
    """The prediction and the ground truth (when known) outlined on the image, then the model's
    own panels (vis_panels: the paper's figures) as heat maps, under the sentence and a legend."""
    image = to_width(image, PANEL_WIDTH, Image.BILINEAR)  # outlines at the size they are seen
    panels = [("prediction", overlay(image, to_width(pred, PANEL_WIDTH, Image.NEAREST),
                                     PRED_COLOUR))]
    legend = [("prediction", PRED_COLOUR)]
    if gt is not None:
        panels.append(("ground truth", overlay(image, to_width(gt, PANEL_WIDTH, Image.NEAREST),
                                               GT_COLOUR)))
        legend.append(("ground truth", GT_COLOUR))
    for title, value in extra:
        panels.append((title, heatmap(image, value.detach().float().cpu().numpy())))
    header = f'"{sentence}"' + (f"  IoU={iou:.3f}" if iou is not None else "")
    return compose(panels, header, legend, scale=bool(extra))
