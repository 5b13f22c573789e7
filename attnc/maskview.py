"""Pictures of a mask and its tile plan, for `attnc mask`: characters for the terminal, a PNG for people.

Notation: classes are the tile plan's, 0 EMPTY (no visible key), 1 PARTIAL (some), 2 FULL (all). An
element mask is the same picture at one element per tile: visible = FULL, masked = EMPTY. Rows are
queries, top to bottom; columns are keys, left to right, as in the score matrix.

Pictures larger than their budget (terminal columns, PNG pixels) are coarsened by merging g x g
cells with the planner's own rule: EMPTY if every cell is EMPTY, FULL if every cell is FULL, else
PARTIAL. A coarsened picture is therefore the exact plan at the larger tile size, never a sample.

The PNG needs no imaging library: a numpy canvas, a 5 x 7 bitmap font, and an encoder of a few
lines (zlib + struct), since matplotlib and PIL are not dependencies of attnc.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

EMPTY, PARTIAL, FULL = 0, 1, 2
CLASS_NAMES = {EMPTY: "EMPTY", PARTIAL: "PARTIAL", FULL: "FULL"}
TILE_CHARS = {EMPTY: ".", PARTIAL: "+", FULL: "#"}
ELEMENT_CHARS = TILE_CHARS  # PARTIAL ('+') only appears where a coarsened character covers both kinds
ELEMENT_NAMES = {EMPTY: "masked", PARTIAL: "some visible", FULL: "visible"}
TERMINAL_WIDTH = 128  # characters of grid per line; wider pictures are coarsened
ELEMENTS_SHOWN = 128  # the element mask is drawn by default when Lq, Lk <= this

# -- coarsening -----------------------------------------------------------------------------------


def coarsen(classes: torch.Tensor, factor: int) -> torch.Tensor:
    """Merge factor x factor cells of a [rows, cols] class grid (edge groups may be smaller)."""
    if factor == 1:
        return classes
    rows, cols = classes.shape
    pad = (0, -cols % factor, 0, -rows % factor)
    # padding is neutral: FULL for "all FULL" (a minimum), EMPTY for "any visible" (a maximum)
    lo = torch.nn.functional.pad(classes.to(torch.int8), pad, value=FULL)
    hi = torch.nn.functional.pad(classes.to(torch.int8), pad, value=EMPTY)
    shape = (lo.shape[0] // factor, factor, lo.shape[1] // factor, factor)
    all_full = lo.reshape(shape).amin(dim=(1, 3)) == FULL
    any_visible = hi.reshape(shape).amax(dim=(1, 3)) > EMPTY
    out = torch.full(all_full.shape, PARTIAL, dtype=torch.int8)
    out[~any_visible] = EMPTY
    out[all_full] = FULL
    return out


def _factor(size: int, budget: int) -> int:
    return max(1, math.ceil(size / budget))


# -- terminal ---------------------------------------------------------------------------------------


def text_grid(classes: torch.Tensor, chars: dict, width: int = TERMINAL_WIDTH) -> tuple[list[str], int]:
    """Lines of a class grid, one character per cell, with row numbers on the left and column numbers
    above; returns (lines, factor) where each character covers factor x factor cells."""
    factor = _factor(max(classes.shape), width)
    grid = coarsen(classes, factor)
    rows, cols = grid.shape
    label = len(str((rows - 1) * factor))
    header = [" "] * cols
    for j in range(0, cols, 10):  # a column number every 10 characters, where it fits
        text = str(j * factor)
        if j + len(text) <= cols:
            header[j:j + len(text)] = text
    lines = [" " * (label + 1) + "".join(header).rstrip()]
    table = grid.tolist()
    for i, row in enumerate(table):
        lines.append(f"{i * factor:>{label}} " + "".join(chars[c] for c in row))
    return lines, factor


def legend(names: dict, classes=(FULL, PARTIAL, EMPTY)) -> str:
    return ", ".join(f"'{TILE_CHARS[c]}' {names[c]}" for c in classes)


def summary(plan, classes=None) -> str:
    """The plan's tile counts; with `classes`, one [tiles_q, tiles_k] slice of plan.to_dense() (the batch
    and head drawn), that slice's counts."""
    if classes is None:
        full, partial, total = plan.tiles_full, plan.tiles_partial, plan.tiles_total
    else:
        full, partial, total = int((classes == FULL).sum()), int((classes == PARTIAL).sum()), classes.numel()
    return (f"block {plan.block_m}x{plan.block_n}: {full + partial} of {total} tiles visited "
            f"(density {(full + partial) / max(total, 1):.4f}): {full} full, {partial} partial")


# -- PNG: canvas, font, encoder ------------------------------------------------------------------

WHITE = (255, 255, 255)
INK = (25, 25, 25)
GRID = (170, 170, 170)
COLOURS = {EMPTY: WHITE, PARTIAL: (245, 166, 35), FULL: (30, 55, 140)}  # white, amber, dark blue

# 5 x 7 glyphs (HD44780 style): seven rows of five bits as hex bytes, bit 4 the leftmost pixel; the
# five letters with descenders take an eighth row below the baseline
FONT = {
    " ": "00000000000000", "?": "0e110102040004", ".": "00000000000c0c",
    ",": "000000000c0408", ":": "000c0c000c0c00", "=": "00001f001f0000", "+": "0004041f040400",
    "-": "0000001f000000", "_": "0000000000001f", "(": "02040808080402", ")": "08040202020408",
    "/": "00010204081000", "%": "18190204081303", "#": "0a0a1f0a1f0a0a", "[": "0e08080808080e",
    "]": "0e02020202020e", "*": "0004150e150400", "<": "02040810080402", ">": "08040201020408",
    "'": "0c040800000000",
    "0": "0e11131519110e", "1": "040c040404040e", "2": "0e11010204081f", "3": "1f02040201110e",
    "4": "02060a121f0202", "5": "1f101e0101110e", "6": "0608101e11110e", "7": "1f010204080808",
    "8": "0e11110e11110e", "9": "0e11110f01020c",
    "A": "0e1111111f1111", "B": "1e11111e11111e", "C": "0e11101010110e", "D": "1c12111111121c",
    "E": "1f10101e10101f", "F": "1f10101e101010", "G": "0e11101711110f",
    "H": "1111111f111111", "I": "0e04040404040e", "J": "0702020202120c", "K": "11121418141211",
    "L": "1010101010101f", "M": "111b1515111111", "N": "11111915131111", "O": "0e11111111110e",
    "P": "1e11111e101010", "Q": "0e11111115120d", "R": "1e11111e141211",
    "S": "0f10100e01011e", "T": "1f040404040404", "U": "1111111111110e", "V": "11111111110a04",
    "W": "1111111515150a", "X": "11110a040a1111", "Y": "1111110a040404", "Z": "1f01020408101f",
    "a": "00000e010f110f", "b": "1010161911111e", "c": "00000e1010110e",
    "d": "01010d1311110f", "e": "00000e111f100e", "f": "0609081c080808", "g": "00000f11110f010e",
    "h": "10101619111111", "i": "04000c0404040e", "j": "020006020202120c", "k": "10101214181412",
    "l": "0c04040404040e", "m": "00001a15151111", "n": "00001619111111", "o": "00000e1111110e",
    "p": "00001e11111e1010", "q": "00000f11110f0101", "r": "00001619101010", "s": "00000e100e011e",
    "t": "08081c08080906", "u": "0000111111130d", "v": "00001111110a04",
    "w": "0000111115150a", "x": "0000110a040a11", "y": "00001111110f010e",
    "z": "00001f0204081f",
}
GLYPH_W, GLYPH_H = 5, 8


def _glyph(ch: str) -> np.ndarray:
    code = FONT.get(ch, FONT["?"]).ljust(2 * GLYPH_H, "0")
    rows = [int(code[i:i + 2], 16) for i in range(0, 2 * GLYPH_H, 2)]
    return np.array([[(r >> (4 - x)) & 1 for x in range(GLYPH_W)] for r in rows], dtype=bool)


def text_bitmap(text: str, scale: int = 2) -> np.ndarray:
    """A [height, width] boolean bitmap of one line of text: 5 x 8 cells, one blank column between."""
    bitmap = np.zeros((GLYPH_H, max(1, len(text) * (GLYPH_W + 1) - 1)), dtype=bool)
    for i, ch in enumerate(text):
        bitmap[:, i * (GLYPH_W + 1):i * (GLYPH_W + 1) + GLYPH_W] = _glyph(ch)
    return bitmap.repeat(scale, axis=0).repeat(scale, axis=1)


class Canvas:
    def __init__(self, width: int, height: int):
        self.pixels = np.full((height, width, 3), 255, dtype=np.uint8)

    def fill(self, x: int, y: int, w: int, h: int, colour):
        self.pixels[max(0, y):y + h, max(0, x):x + w] = colour

    def stamp(self, x: int, y: int, bitmap: np.ndarray, colour=INK):
        h, w = bitmap.shape
        self.pixels[y:y + h, x:x + w][bitmap] = colour

    def text(self, x: int, y: int, text: str, scale: int = 2, colour=INK, anchor: str = "left"):
        bitmap = text_bitmap(text, scale)
        if anchor == "centre":
            x -= bitmap.shape[1] // 2
        elif anchor == "right":
            x -= bitmap.shape[1]
        self.stamp(x, y, bitmap, colour)


def encode_png(pixels: np.ndarray, description: str = "") -> bytes:
    """An 8-bit RGB PNG of a [height, width, 3] uint8 array (filter 0 on every row)."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), pixels.reshape(height, width * 3)], axis=1)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if description:
        png += chunk(b"tEXt", b"Description\0" + description.encode("latin-1", "replace"))
    return png + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b"")


# -- PNG: the figure ------------------------------------------------------------------------------

PANEL_PX = 640  # longest side of a panel; finer grids are coarsened
SCALE = 2  # font scale: 10 x 16 pixel glyph cells
LINE = (GLYPH_H + 2) * SCALE  # one line of text, with spacing
ADVANCE = (GLYPH_W + 1) * SCALE  # one character


@dataclass(frozen=True)
class Panel:
    """Where a class grid was drawn: cell (i, j) covers pixels [y + i*cell, y + (i+1)*cell) x ..."""

    x: int
    y: int
    cell: int  # pixels per drawn cell
    factor: int  # grid cells (tiles or elements) merged into one drawn cell
    rows: int  # drawn cells
    cols: int

    def centre(self, i: int, j: int) -> tuple[int, int]:
        """Pixel (x, y) at the centre of drawn cell (i, j)."""
        return self.x + j * self.cell + self.cell // 2, self.y + i * self.cell + self.cell // 2


def _panel_geometry(shape, max_cell: int) -> tuple[int, int]:
    factor = _factor(max(shape), PANEL_PX)
    cells = math.ceil(max(shape) / factor)
    return min(max_cell, PANEL_PX // cells), factor


def _tick_step(cell_px: float, widest: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... units whose ticks leave room for their labels."""
    for magnitude in range(12):
        for base in (1, 2, 5):
            step = base * 10 ** magnitude
            if step * cell_px >= widest + 2 * ADVANCE:
                return step
    return 10 ** 12


@dataclass
class _Layout:
    grid: torch.Tensor  # coarsened classes
    cell: int
    factor: int
    unit: int  # grid cells per axis unit (block size for an element panel with tile lines)
    width: int
    height: int


def _layout(classes: torch.Tensor, max_cell: int) -> _Layout:
    cell, factor = _panel_geometry(classes.shape, max_cell)
    grid = coarsen(classes, factor)
    return _Layout(grid, cell, factor, 1, grid.shape[1] * cell, grid.shape[0] * cell)


def _draw_panel(canvas: Canvas, x: int, y: int, lay: _Layout, heading: str, x_label: str, y_label: str,
                extent: tuple[int, int], lines_every: tuple[int, int] | None) -> Panel:
    """A class grid at (x, y) with a heading above, tick numbers and axis labels; returns its geometry."""
    canvas.text(x, y - LINE - 4, heading)
    rgb = np.array([COLOURS[c] for c in (EMPTY, PARTIAL, FULL)], dtype=np.uint8)
    image = rgb[lay.grid.long().numpy()].repeat(lay.cell, axis=0).repeat(lay.cell, axis=1)
    canvas.pixels[y:y + lay.height, x:x + lay.width] = image
    if lines_every is not None:  # thin lines between tiles, where there is room for them
        every_r, every_c = lines_every
        for i in range(every_r, lay.grid.shape[0], every_r):
            canvas.fill(x, y + i * lay.cell, lay.width, 1, GRID)
        for j in range(every_c, lay.grid.shape[1], every_c):
            canvas.fill(x + j * lay.cell, y, 1, lay.height, GRID)
    # frame
    canvas.fill(x - 1, y - 1, lay.width + 2, 1, INK)
    canvas.fill(x - 1, y + lay.height, lay.width + 2, 1, INK)
    canvas.fill(x - 1, y - 1, 1, lay.height + 2, INK)
    canvas.fill(x + lay.width, y - 1, 1, lay.height + 2, INK)
    # ticks: numbers of grid cells (tiles or elements), at the centre of the cell they name
    n_rows, n_cols = extent
    px_per_unit = lay.cell / lay.factor
    step = _tick_step(px_per_unit, len(str(max(n_rows, n_cols) - 1)) * ADVANCE)
    for t in range(0, n_cols, step):
        tx = x + int((t + 0.5) * px_per_unit) if lay.factor == 1 else x + int(t * px_per_unit)
        canvas.fill(tx, y + lay.height, 1, 5, INK)
        canvas.text(tx, y + lay.height + 7, str(t), anchor="centre")
    row_step = _tick_step(px_per_unit, LINE)
    for t in range(0, n_rows, row_step):
        ty = y + int((t + 0.5) * px_per_unit) if lay.factor == 1 else y + int(t * px_per_unit)
        canvas.fill(x - 6, ty, 5, 1, INK)
        canvas.text(x - 9, ty - GLYPH_H * SCALE // 2, str(t), anchor="right")
    canvas.text(x + lay.width // 2, y + lay.height + 7 + LINE, x_label, anchor="centre")
    label = np.rot90(text_bitmap(y_label, SCALE))  # reads bottom to top, as y labels do
    margin = 9 + len(str(n_rows - 1)) * ADVANCE + 6 + label.shape[1]
    canvas.stamp(x - margin, y + (lay.height - label.shape[0]) // 2, label)
    return Panel(x, y, lay.cell, lay.factor, *lay.grid.shape)


LEGEND = ((FULL, "FULL: every element visible"), (PARTIAL, "PARTIAL: some visible"), (EMPTY, "EMPTY: skipped"))


def figure(title: list[str], tiles: torch.Tensor, block: tuple[int, int],
           elements: torch.Tensor | None = None) -> tuple[np.ndarray, dict]:
    """Draw the tile classes [tiles_q, tiles_k] (and, if given, the element mask [Lq, Lk] with the tile
    grid over it) under the title lines, with a legend; returns (pixels, {"tiles": Panel, "elements": Panel})."""
    layouts = {"tiles": _layout(tiles, max_cell=32)}
    if elements is not None:
        layouts["elements"] = _layout(torch.where(elements, FULL, EMPTY).to(torch.int8), max_cell=16)
    margin_left = 3 * LINE + 5 * ADVANCE  # y label and tick numbers
    gap = 3 * ADVANCE
    top = 8 + len(title) * LINE + LINE + 16  # title lines, then a panel heading
    swatch = LINE + 6
    legend_w = sum(swatch + 8 + (len(name) + 3) * ADVANCE for _, name in LEGEND)
    panels_w = sum(margin_left + lay.width + gap for lay in layouts.values())
    panels_h = max(lay.height for lay in layouts.values())
    legend_y = top + panels_h + 2 * LINE + 24
    width = max(panels_w, ADVANCE * (max(map(len, title)) + 2), legend_w + ADVANCE)
    canvas = Canvas(width, legend_y + 2 * LINE)
    for i, line in enumerate(title):
        canvas.text(ADVANCE, 8 + i * LINE, line)
    panels = {}
    x = margin_left
    plan_lay = layouts["tiles"]
    panels["tiles"] = _draw_panel(canvas, x, top, plan_lay, "tile plan", "key tile", "query tile",
                                  tuple(tiles.shape), (1, 1) if plan_lay.cell >= 6 else None)
    if elements is not None:
        lay = layouts["elements"]
        x += plan_lay.width + gap + margin_left
        every = (max(1, block[0] // lay.factor), max(1, block[1] // lay.factor))
        lines = every if min(every) * lay.cell >= 4 else None  # tile lines only where tiles are 4+ px
        panels["elements"] = _draw_panel(canvas, x, top, lay, "element mask and tiles", "key", "query",
                                         tuple(elements.shape), lines)
    lx = ADVANCE
    for cls, name in LEGEND:
        canvas.fill(lx, legend_y, swatch, LINE, INK)
        canvas.fill(lx + 1, legend_y + 1, swatch - 2, LINE - 2, COLOURS[cls])
        canvas.text(lx + swatch + 8, legend_y + 3, name)
        lx += swatch + 8 + (len(name) + 3) * ADVANCE
    return canvas.pixels, panels
