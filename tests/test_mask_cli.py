"""`attnc mask`: the terminal pictures and the PNG against tile classes brute-forced here from masks
written by hand (EMPTY: no visible element in the tile, FULL: all visible, else PARTIAL)."""

from __future__ import annotations

import dataclasses
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from attnc import maskview

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import run_cli as run

CAUSAL = "attention causal\nmask kv <= q\n"
# 2-D neighborhood (NATTEN borders) on a 6 x 10 grid with 3 x 5 windows: L = 60 is no multiple of the
# tile sizes used below, so edge tiles are short
NEIGHBORHOOD = """\
attention nbhd
const Y = 6, X = 10, KY = 3, KX = 5
let (qy, qx) = unravel(q, Y, X)
let (ky, kx) = unravel(kv, Y, X)
let cy = clamp(qy, KY // 2, Y - 1 - KY // 2)
let cx = clamp(qx, KX // 2, X - 1 - KX // 2)
mask abs(ky - cy) <= KY // 2 and abs(kx - cx) <= KX // 2
"""
MOA = "attention moa\ninput band: int[Hq]\nmask kv <= q and (kv < 8 or q - kv < band[h])\n"
DOCUMENT = "attention document\ninput doc_ids: int[B, L]\nmask doc_ids[b, q] == doc_ids[b, kv] and kv <= q\n"
BAD = "attention bad\nparam window = 3\nmask kv <= q and q - kv < windw\n"


# -- masks written by hand, and the brute-force classification ----------------------------------------


def causal_mask(L):
    i = torch.arange(L)
    return i[None, :] <= i[:, None]


def neighborhood_mask(Y=6, X=10, KY=3, KX=5):
    i = torch.arange(Y * X)
    y, x = i // X, i % X
    cy = y.clamp(KY // 2, Y - 1 - KY // 2)  # NATTEN: the window shifts at borders, never shrinks
    cx = x.clamp(KX // 2, X - 1 - KX // 2)
    return ((y[None, :] - cy[:, None]).abs() <= KY // 2) & ((x[None, :] - cx[:, None]).abs() <= KX // 2)


def moa_mask(L, band):
    i = torch.arange(L)
    q, kv = i[:, None], i[None, :]
    return (kv <= q) & ((kv < 8) | (q - kv < band))


def document_mask(doc_ids):
    i = torch.arange(len(doc_ids))
    return (doc_ids[:, None] == doc_ids[None, :]) & (i[None, :] <= i[:, None])


def brute_force_tiles(mask, bm, bn):
    Lq, Lk = mask.shape
    out = []
    for i in range(0, Lq, bm):
        row = []
        for j in range(0, Lk, bn):
            tile = mask[i:i + bm, j:j + bn]
            row.append(maskview.FULL if tile.all() else maskview.PARTIAL if tile.any() else maskview.EMPTY)
        out.append(row)
    return torch.tensor(out, dtype=torch.int8)


# -- running the CLI and reading its pictures back ----------------------------------------------------




@pytest.fixture
def specs(tmp_path):
    files = {}
    for name, text in {"causal": CAUSAL, "nbhd": NEIGHBORHOOD, "moa": MOA, "document": DOCUMENT,
                       "bad": BAD, "window": "attention window\nparam window = 3\nmask kv <= q and q - kv < window\n"}.items():
        files[name] = tmp_path / f"{name}.attn"
        files[name].write_text(text)
    return files


def section(out: str, heading: str, chars: dict) -> torch.Tensor:
    """The grid printed under the line starting with `heading`, as classes."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    back = {c: cls for cls, c in chars.items()}
    rows = []
    for line in lines[start + 2:]:  # skip the heading and the column numbers
        m = re.fullmatch(r"\s*\d+ ([.#+]+)", line)
        if not m:
            break
        rows.append([back[c] for c in m.group(1)])
    return torch.tensor(rows, dtype=torch.int8)


def test_causal_terminal_matches_brute_force(specs):
    code, out = run("mask", specs["causal"], "--L", 40, "--block", "16,8")
    assert code == 0, out
    mask = causal_mask(40)
    assert torch.equal(section(out, "element mask", maskview.ELEMENT_CHARS), mask.to(torch.int8) * maskview.FULL)
    tiles = brute_force_tiles(mask, 16, 8)
    assert torch.equal(section(out, "tile plan", maskview.TILE_CHARS), tiles)
    visited = int((tiles > 0).sum())
    assert (f"block 16x8: {visited} of {tiles.numel()} tiles visited (density {visited / tiles.numel():.4f}): "
            f"{int((tiles == 2).sum())} full, {int((tiles == 1).sum())} partial") in out
    assert "'#' FULL, '+' PARTIAL, '.' EMPTY" in out  # the legend


@pytest.mark.parametrize("block", ["8", "16,8", "4,16"])
def test_neighborhood_2d_terminal_matches_brute_force(specs, block):
    code, out = run("mask", specs["nbhd"], "--block", block)  # the grid fixes L = 60
    assert code == 0, out
    assert "Lq=60 Lk=60" in out
    bm, bn = (int(b) for b in (block.split(",") * 2)[:2])
    mask = neighborhood_mask()
    assert torch.equal(section(out, "element mask", maskview.ELEMENT_CHARS), mask.to(torch.int8) * maskview.FULL)
    assert torch.equal(section(out, "tile plan", maskview.TILE_CHARS), brute_force_tiles(mask, bm, bn))


def test_per_head_plan_and_given_tensor(specs):
    bands = [3, 17, 40]
    code, out = run("mask", specs["moa"], "--shape", "1,3,48,48", "--head", 1, "--block", 8,
                    "--param", "band=" + ",".join(map(str, bands)), "--no-elements")
    assert code == 0, out
    assert "element mask" not in out and "note:" not in out  # nothing random: band was given
    assert torch.equal(section(out, "tile plan", maskview.TILE_CHARS), brute_force_tiles(moa_mask(48, 17), 8, 8))


def test_document_ids_given_and_random(specs):
    doc_ids = torch.tensor([0] * 5 + [1] * 9 + [2] * 3 + [3] * 15)
    code, out = run("mask", specs["document"], "--L", 32, "--block", 8,
                    "--param", "doc_ids=" + ",".join(map(str, doc_ids.tolist())))
    assert code == 0, out
    assert torch.equal(section(out, "tile plan", maskview.TILE_CHARS), brute_force_tiles(document_mask(doc_ids), 8, 8))
    code, out = run("mask", specs["document"], "--L", 32, "--block", 8)
    assert code == 0, out
    assert "note: doc_ids: random (seed 0)" in out


def test_wide_pictures_are_coarsened_exactly(specs):
    # 300 elements in 128 columns: 3 x 3 elements per character, merged like a 3 x 3 tile
    code, out = run("mask", specs["causal"], "--L", 300, "--block", 64, "--elements")
    assert code == 0, out
    assert "each character: 3x3 elements" in out
    shown = section(out, "element mask", maskview.ELEMENT_CHARS)
    assert torch.equal(shown, brute_force_tiles(causal_mask(300), 3, 3))
    code, out = run("mask", specs["causal"], "--L", 300, "--block", 64)
    assert "element mask" not in out  # larger than 128: not drawn unless asked


def test_coarsen_is_the_plan_at_the_larger_tile():
    mask = neighborhood_mask()
    elements = mask.to(torch.int8) * maskview.FULL
    for factor in (2, 4, 7):
        assert torch.equal(maskview.coarsen(elements, factor), brute_force_tiles(mask, factor, factor))
    tiles = brute_force_tiles(mask, 4, 4)
    assert torch.equal(maskview.coarsen(tiles, 3), brute_force_tiles(mask, 12, 12))


# -- the PNG --------------------------------------------------------------------------------------


def read_png(data: bytes):
    """(width, height, pixels [h, w, 3]) of an 8-bit RGB PNG, checking signature, CRCs and sizes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)  # 8-bit RGB
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()  # filter type None on every row, the only one the encoder writes
    return width, height, rows[:, 1:].reshape(height, width, 3)


def located(pixels, panel):
    """The panel as drawn: the figure's geometry is ours, but its top depends on the title, so find the
    frame's top edge (a line of ink as wide as the panel) and move the panel there."""
    ink = (pixels == np.array(maskview.INK, dtype=np.uint8)).all(axis=-1)
    edge = ink[:, panel.x - 1:panel.x + panel.cols * panel.cell + 1].all(axis=1)
    return dataclasses.replace(panel, y=int(np.argmax(edge)) + 1)


def assert_colours(pixels, panel, classes):
    for i in range(classes.shape[0]):
        for j in range(classes.shape[1]):
            x, y = panel.centre(i, j)
            assert tuple(pixels[y, x]) == maskview.COLOURS[int(classes[i, j])], (i, j)


def test_png_is_valid_and_tiles_have_their_class_colours(specs, tmp_path):
    target = tmp_path / "nbhd.png"
    code, out = run("mask", specs["nbhd"], "--block", "8,4", "--png", target)
    assert code == 0, out
    assert f"wrote {target}" in out
    width, height, pixels = read_png(target.read_bytes())
    assert 200 <= width <= 2000 and 100 <= height <= 1200
    # the figure's geometry comes from its shapes; the expected colours from the brute force
    mask = neighborhood_mask()
    tiles = brute_force_tiles(mask, 8, 4)
    _, panels = maskview.figure(["x"], tiles, (8, 4), mask)
    assert panels["tiles"].cell >= 8  # legible: at least 8 pixels per tile
    assert_colours(pixels, located(pixels, panels["tiles"]), tiles)
    assert_colours(pixels, located(pixels, panels["elements"]), mask.to(torch.int8) * maskview.FULL)
    for colour in maskview.COLOURS.values():  # the legend's swatches, whatever the plan holds
        assert (pixels == np.array(colour, dtype=np.uint8)).all(axis=-1).any()


def test_png_of_a_large_plan_is_capped(specs, tmp_path):
    target = tmp_path / "causal.png"
    code, out = run("mask", specs["causal"], "--L", 8192, "--block", 8, "--png", target)  # 1024 x 1024 tiles
    assert code == 0, out
    width, height, pixels = read_png(target.read_bytes())
    assert width <= 2000 and height <= 1200
    _, panels = maskview.figure(["x"], torch.zeros(1024, 1024, dtype=torch.int8), (8, 8))  # geometry only
    assert panels["tiles"].factor == 2  # 1024 tiles in 640 pixels: 2 x 2 tiles a pixel
    coarse = torch.tril(torch.full((512, 512), maskview.FULL, dtype=torch.int8), -1)
    coarse.diagonal().fill_(maskview.PARTIAL)
    for i, j in [(0, 0), (5, 2), (300, 299), (511, 511), (100, 400)]:
        x, y = located(pixels, panels["tiles"]).centre(i, j)
        assert tuple(pixels[y, x]) == maskview.COLOURS[int(coarse[i, j])], (i, j)


def test_font_draws_every_character_of_its_titles():
    bitmap = maskview.text_bitmap("neighborhood_2d  Lq=60 Lk=60: 0.4375 (x)", scale=1)
    assert bitmap.shape == (maskview.GLYPH_H, 40 * 6 - 1)
    unknown = maskview.text_bitmap("\u00e9", scale=1)
    assert torch.equal(torch.from_numpy(unknown), torch.from_numpy(maskview.text_bitmap("?", scale=1)))


# -- errors: one clear line, no traceback ---------------------------------------------------------


def test_bad_spec_is_a_located_diagnostic(specs):
    code, out = run("mask", specs["bad"])
    assert code == 1
    assert f"{specs['bad']}:3:27: error: unknown name 'windw'" in out


@pytest.mark.parametrize("args, message", [
    (["--shape", "64,x"], "Invalid value for '--shape': expected 2 or 4 positive integers"),
    (["--shape", "1,2,3"], "Invalid value for '--shape'"),
    (["--L", "64", "--shape", "64,64"], "give --L or --shape, not both"),
    (["--L", "0"], "Invalid value for '--L'"),
    (["--block", "24"], "Invalid value for '--block': tile sizes must be powers of two"),
    (["--param", "windw=3"], "the spec has no parameter or tensor input 'windw' (it has none)"),
    (["--head", "1"], "batch 0, head 1 is outside B=1, Hq=1"),
])
def test_bad_options_exit_2_with_one_message(specs, args, message):
    code, out = run("mask", specs["causal"], *args)
    assert code == 2
    assert message in out


def test_unknown_param_suggests_the_closest_name(specs):
    code, out = run("mask", specs["moa"], "--param", "bands=1")
    assert code == 2
    assert "the spec has no tensor input 'bands'; did you mean 'band'?" in out
    code, out = run("mask", specs["moa"], "--shape", "1,2,16,16", "--param", "band=1,2,3")
    assert code == 2
    assert "band: expected 2 values for its shape [Hq] = [2], got 3" in out


def test_unknown_param_is_called_a_parameter_and_counts_read_in_english(specs):
    code, out = run("mask", specs["window"], "--param", "windw=3")
    assert code == 2
    assert "the spec has no parameter 'windw'; did you mean 'window'?" in out
    code, out = run("mask", specs["moa"], "--param", "band=1,2")  # B = Hq = 1: one value
    assert code == 2
    assert "band: expected 1 value for its shape [Hq] = [1], got 2" in out


def test_the_summary_counts_the_batch_drawn(specs):
    """--batch 1 draws batch 1's plan and counts batch 1's tiles, not those of every batch."""
    ids = [torch.zeros(16, dtype=torch.long), torch.arange(16) // 2]  # one document; documents of 2
    flat = ",".join(str(int(x)) for x in torch.cat(ids))
    for batch in (0, 1):
        code, out = run("mask", specs["document"], "--shape", "2,1,16,16", "--block", 4, "--batch", batch,
                        "--param", "doc_ids=" + flat)
        assert code == 0, out
        tiles = brute_force_tiles(document_mask(ids[batch]), 4, 4)
        assert torch.equal(section(out, "tile plan", maskview.TILE_CHARS), tiles)
        full, partial = int((tiles == maskview.FULL).sum()), int((tiles == maskview.PARTIAL).sum())
        assert (f"block 4x4: {full + partial} of 16 tiles visited (density {(full + partial) / 16:.4f}): "
                f"{full} full, {partial} partial") in out, out


def test_arguments_the_function_rejects_exit_2(specs):
    code, out = run("mask", specs["document"], "--shape", "16,32")  # Lq != Lk on an L axis
    assert code == 2
    assert "document" in out and "Error:" in out


def test_unwritable_png_exit_1(specs, tmp_path):
    code, out = run("mask", specs["causal"], "--L", 16, "--png", tmp_path / "no" / "such" / "dir.png")
    assert code == 1
    assert "error: cannot write" in out


def test_plans_too_large_to_draw_are_refused(specs):
    code, out = run("mask", specs["causal"], "--L", 1 << 24, "--block", "128,128")
    assert code == 2
    assert "131072 x 131072 tiles per head are too many to draw" in out


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_default_display_tiles_give_a_useful_grid_on_every_machine(monkeypatch, interpret):
    """The 16 x 16 grid of neighborhood_2d (L = 256) is drawn as 16 x 16 tiles of 16, not 2 x 2 tiles
    of the GPU's plan size, and the picture does not depend on the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    examples = Path(__file__).resolve().parents[1] / "examples"
    code, out = run("mask", examples / "neighborhood_2d.attn", "--no-elements")
    assert code == 0, out
    assert "block 16x16: 112 of 256 tiles visited" in out
