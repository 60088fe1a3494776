"""Masks -> response bodies: indexed PNG, the JSON summary with the PNG inside, per-class RLE and polygons,
instances, the overlay, probabilities. Every mask encoder takes a `MaskSet` (segserve.masks), so classes that
overlap (multi-label heads) keep their own masks."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from PIL import Image

from .config import ServingConfig
from .errors import LimitExceeded, PayloadTooLarge, ResponseTooLarge
from .masks import MaskSet, instances

OVERLAY_BAND_PIXELS = 1 << 16

# zlib level for mask PNGs: masks are flat regions and compress well already at
# low levels, while higher levels cost several times the CPU for a few % bytes.
PNG_COMPRESS_LEVEL = 1

POLYGON_COORDINATES = ("pixel edges, x right, y down, origin at the top-left corner of the image: pixel (x, y) is "
                       "the square [x, x + 1] x [y, y + 1]")


def mask_to_png(mask: np.ndarray, palette: list[int], compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """uint8 class-index mask (H, W) -> indexed ("P" mode) PNG bytes with the class palette.

    Viewers show the colours; numpy/Pillow read back the class ids unchanged.
    """
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"expected a uint8 (H, W) mask, got {mask.dtype} {mask.shape}")
    image = Image.fromarray(mask, mode="P")
    image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def bbox(binary: np.ndarray) -> list[int] | None:
    """COCO-style [x, y, width, height] of the True pixels; None when there are none."""
    rows, cols = np.flatnonzero(binary.any(1)), np.flatnonzero(binary.any(0))
    if rows.size == 0:
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def class_entry(class_info, binary: np.ndarray) -> dict:
    pixels = int(binary.sum())
    return {"id": class_info.id, "name": class_info.name, "pixels": pixels,
            "fraction": round(pixels / binary.size, 6), "bbox": bbox(binary)}


def selected(config: ServingConfig, classes: tuple[int, ...] | None):
    return [c for c in config.classes if classes is None or c.id in classes]


def class_summary(masks: MaskSet | np.ndarray, config: ServingConfig,
                  classes: tuple[int, ...] | None = None) -> list[dict]:
    """Per class: id, name, pixel count, fraction of the image and bounding box (its own mask where classes
    overlap)."""
    masks = MaskSet.of(masks)
    return [class_entry(c, masks.binary(c.id)) for c in selected(config, classes)]


def _answer_head(masks: MaskSet, config: ServingConfig) -> dict:
    """What every JSON answer starts with: the model, how it was served, and the mask's size."""
    height, width = masks.shape
    return {"model": config.name, "version": config.version, "family": config.family, "head": config.head,
            "width": int(width), "height": int(height)}


def _dumps(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def json_response(masks: MaskSet | np.ndarray, config: ServingConfig, classes: tuple[int, ...] | None = None) -> bytes:
    """The default response: model, size, per-class summary and the mask as base64 PNG."""
    masks = MaskSet.of(masks)
    masks = masks.keep_classes(classes)
    return _dumps({**_answer_head(masks, config), "classes": class_summary(masks, config, classes),
                   "mask": base64.b64encode(mask_to_png(masks.labels, config.palette)).decode("ascii"),
                   "mask_format": "png;base64"})


def rle_response(masks: MaskSet | np.ndarray, config: ServingConfig, classes: tuple[int, ...] | None = None) -> bytes:
    """Per class, COCO compressed RLE (`pycocotools.mask.decode` gives back the class's binary mask)."""
    masks = MaskSet.of(masks)
    from pycocotools import mask as coco_mask

    entries = []
    size, limit = 0, config.limits.max_response_bytes
    for c in selected(config, classes):
        binary = masks.binary(c.id)
        rle = coco_mask.encode(np.asfortranarray(binary.astype(np.uint8)))
        size += len(rle["counts"])
        if size > limit:  # known class by class, before the JSON text is made
            raise ResponseTooLarge(f"format=rle for this {masks.shape[1]}x{masks.shape[0]} mask is over {limit} bytes "
                                   "(max_response_bytes): use format=png, or min_area=... to drop small regions")
        entries.append({**class_entry(c, binary),
                        "rle": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}})
    return _dumps({**_answer_head(masks, config), "classes": entries, "mask_format": "coco_rle"})


def ring_count(binary: np.ndarray) -> int:
    """At least as many rings as tracing `binary` finds: its 8-connected regions (an outline each) and the
    4-connected regions of the rest (the holes, and the background around), counted in linear time."""
    import cv2

    if not binary.any():
        return 0
    regions = cv2.connectedComponents(binary.astype(np.uint8), connectivity=8)[0] - 1
    rest = cv2.connectedComponents((~binary).astype(np.uint8), connectivity=4)[0] - 1
    return regions + rest


def _corner_pairs(labels: np.ndarray) -> np.ndarray:
    """(k, 2) pairs of different 4-connected regions that meet only at a pixel corner (a 2x2 window of two
    diagonal region pixels and two background ones), each pair once."""
    top_left, bottom_right = labels[:-1, :-1], labels[1:, 1:]
    top_right, bottom_left = labels[:-1, 1:], labels[1:, :-1]
    found = []
    for a, b, c, d in ((top_left, bottom_right, top_right, bottom_left), (top_right, bottom_left, top_left,
                                                                          bottom_right)):
        pinch = (a > 0) & (b > 0) & (c == 0) & (d == 0) & (a != b)
        found.append(np.stack([a[pinch], b[pinch]], axis=1))
    pairs = np.sort(np.concatenate(found), axis=1).astype(np.int64)
    if not len(pairs):
        return pairs
    span = int(labels.max()) + 1
    keys = np.unique(pairs[:, 0] * span + pairs[:, 1])  # one number per pair: a 1-D unique, several times faster
    return np.stack([keys // span, keys % span], axis=1)


def _layers(labels: np.ndarray, count: int) -> np.ndarray:
    """A layer per 4-connected region (0 = background), such that regions of one layer never meet at a corner:
    each layer is then traced at once with every ring exact. Greedy colouring of the regions that meet; the
    others all go in layer 1."""
    layer = np.ones(count, np.int32)
    layer[0] = 0
    pairs = _corner_pairs(labels)
    if not len(pairs):
        return layer
    neighbours: dict[int, list[int]] = {}
    for a, b in pairs.tolist():
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    chosen: dict[int, int] = {}
    for region, others in neighbours.items():
        taken = {chosen[o] for o in others if o in chosen}
        chosen[region] = next(n for n in range(1, len(taken) + 2) if n not in taken)
    regions = np.fromiter(chosen, np.int64, len(chosen))
    layer[regions] = np.fromiter(chosen.values(), np.int32, len(chosen))
    return layer


def _layer_polygons(contours, hierarchy: np.ndarray) -> np.ndarray:
    """The polygons of one layer's contours (RETR_CCOMP: outlines, each with its holes), built by shapely in
    one call each for the rings and the polygons: Python per ring costs seconds on 50,000 small regions."""
    import shapely

    lengths = np.fromiter((len(c) for c in contours), np.int64, len(contours))
    # On the 2x mask pixel x spans columns 2x and 2x + 1; the outline runs through the centres of the boundary
    # columns, so column 2x (a left side) -> edge x and 2x + 1 (a right side) -> edge x + 1: u -> (u + 1) // 2.
    points = (np.concatenate(contours).reshape(-1, 2) + 1) // 2
    ring = np.repeat(np.arange(len(contours)), lengths)
    keep = np.ones(len(points), bool)  # repeats where the outline crossed a pixel corner diagonally
    keep[1:] = (ring[1:] != ring[:-1]) | (points[1:] != points[:-1]).any(1)
    rings = shapely.linearrings(points[keep], indices=ring[keep])
    parents = hierarchy[:, 3]
    owner = np.where(parents == -1, np.arange(len(contours)), parents)  # a hole belongs to its outline
    order = np.lexsort((parents != -1, owner))  # per polygon its outline, then its holes
    polygon = np.unique(owner[order], return_inverse=True)[1]
    return shapely.polygons(rings[order], indices=polygon)


def polygon_geometry(binary: np.ndarray, max_vertices: int | None = None):
    """A binary mask as a valid shapely MultiPolygon whose area is exactly the mask's pixels (None if empty).

    A pixel (x, y) is the square [x, x + 1] x [y, y + 1]. OpenCV traces pixel centres, whose rings are not the
    pixels' outline and cross themselves where regions are one pixel wide; tracing the mask upsampled 2x and
    moving each vertex to its pixel's edge gives the exact outline. A valid polygon's inside is connected, so
    pixels that meet only at a corner belong to different polygons, and OpenCV's tracing joins them (shapely's
    make_valid then takes minutes on a checkerboard): the 4-connected regions are traced in layers in which no
    two meet at a corner, which leaves rings that only touch at corners, as OGC allows. Over `max_vertices`
    traced, LimitExceeded before any geometry is built.
    """
    import cv2
    import shapely

    if not binary.any():
        return None
    count, labels = cv2.connectedComponents(binary.astype(np.uint8), connectivity=4)
    layer_of = _layers(labels, count)
    traced, vertices = [], 0
    for layer in range(1, int(layer_of.max()) + 1):
        mask = (layer_of[labels] == layer).astype(np.uint8)
        doubled = np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1)
        del mask
        contours, hierarchy = cv2.findContours(doubled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        del doubled
        vertices += sum(len(contour) + 1 for contour in contours)
        if max_vertices is not None and vertices > max_vertices:
            raise LimitExceeded(f"format=polygons: this mask traces to over {max_vertices} vertices "
                                "(max_polygon_vertices): use format=rle or png, or min_area=... to drop small regions")
        if contours:
            traced.append((contours, hierarchy[0]))
    del labels
    geometry = shapely.MultiPolygon(np.concatenate([_layer_polygons(*layer) for layer in traced]))
    if not geometry.is_valid:  # not seen on any mask tried (tests/test_formats.py): a safety net
        geometry = made_valid(geometry)
    return shapely.orient_polygons(geometry)  # RFC 7946: exteriors counterclockwise, holes clockwise


def made_valid(geometry):
    """A valid MultiPolygon covering what `geometry`'s exteriors cover, less its holes (shapely's "structure"
    method: the union of the pixels, however the rings touched or overlapped)."""
    import shapely

    return _polygonal(shapely.make_valid(geometry, method="structure", keep_collapsed=False))


def _polygonal(geometry):
    """The polygonal parts of what shapely.make_valid returned, as one MultiPolygon."""
    import shapely

    polygons = []
    for part in shapely.get_parts(geometry):
        if isinstance(part, shapely.Polygon):
            polygons.append(part)
        elif isinstance(part, shapely.MultiPolygon | shapely.GeometryCollection):
            polygons.extend(_polygonal(part).geoms)
    return shapely.MultiPolygon(polygons)


def polygons(binary: np.ndarray, max_vertices: int | None = None) -> list[list[list[list[int]]]]:
    """GeoJSON MultiPolygon coordinates of a binary mask: [[exterior, hole, ...], ...], closed rings of [x, y]
    on pixel-edge corners (see polygon_geometry)."""
    import shapely

    geometry = polygon_geometry(binary, max_vertices)
    if geometry is None:
        return []
    # All coordinates in one call, then cut into rings and polygons: Python per ring is only a slice.
    rings, polygon_of = shapely.get_rings(shapely.get_parts(geometry), return_index=True)
    coordinates = shapely.get_coordinates(rings).round().astype(np.int64).tolist()
    ends = np.cumsum(shapely.get_num_coordinates(rings)).tolist()
    shapes: list[list[list[list[int]]]] = []
    start, last = 0, -1
    for end, owner in zip(ends, polygon_of.tolist(), strict=True):
        if owner != last:
            shapes.append([])
            last = owner
        shapes[-1].append(coordinates[start:end])
        start = end
    return shapes


def polygons_response(masks: MaskSet | np.ndarray, config: ServingConfig,
                      classes: tuple[int, ...] | None = None) -> bytes:
    """A GeoJSON FeatureCollection (RFC 7946), one Feature per class asked for: a MultiPolygon (empty where the
    class is absent) with the class's id, name, area in pixels and fraction of the image; overlapping classes
    (multi-label heads) keep their own geometries. Coordinates are pixel edges, not longitude/latitude."""
    masks = MaskSet.of(masks)
    limits = config.limits
    rings_left, vertices_left = limits.max_polygon_rings, limits.max_polygon_vertices
    features = []
    for c in selected(config, classes):
        binary = masks.binary(c.id)
        # OpenCV's tracing with holes takes time that grows faster than the number of rings: counted first.
        rings_left -= ring_count(binary)
        if rings_left < 0:
            raise LimitExceeded(f"format=polygons: this mask has more than {limits.max_polygon_rings} rings (outlines "
                                "and holes) to trace (max_polygon_rings): use format=rle or png, or min_area=... "
                                "to drop small regions")
        shapes = polygons(binary, vertices_left)
        vertices_left -= sum(len(ring) for shape in shapes for ring in shape)
        entry = class_entry(c, binary)
        feature = {"type": "Feature", "id": c.id,
                   "properties": {"class_id": c.id, "class": c.name, "area": entry["pixels"],
                                  "fraction": entry["fraction"]},
                   "geometry": {"type": "MultiPolygon", "coordinates": shapes}}
        if (box := entry["bbox"]) is not None:  # GeoJSON's bbox: [min x, min y, max x, max y]
            feature["bbox"] = [box[0], box[1], box[0] + box[2], box[1] + box[3]]
        features.append(feature)
    # The answer's head (model, size, ...) as GeoJSON "foreign members" beside type and features.
    return _dumps({"type": "FeatureCollection", "features": features, **_answer_head(masks, config),
                   "mask_format": "polygons", "pixel_coordinates": POLYGON_COORDINATES})


def instance_mask_png(ids: np.ndarray) -> bytes:
    """uint16 instance ids (H, W) as a 16-bit greyscale PNG (0 = no instance)."""
    buffer = io.BytesIO()
    Image.fromarray(ids.astype(np.uint16)).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def instances_response(masks: MaskSet | np.ndarray, config: ServingConfig, classes: tuple[int, ...] | None = None,
                       with_mask: bool = False) -> bytes:
    """Connected regions (8-connected) of every class but the background: per region its id (1, 2, ... in
    class order, then top-to-bottom), class, area, bbox and centroid; per class the count. With `with_mask`,
    the uint16 instance-id PNG (where classes overlap, a pixel shows the last instance drawn over it)."""
    masks = MaskSet.of(masks)
    entries, counts = [], []
    ids = np.zeros(masks.shape, np.uint16) if with_mask else None
    for c in selected(config, classes):
        if c.id == 0:
            continue
        regions, found = instances(masks.binary(c.id))
        if with_mask and len(entries) + len(found) > 65_535:
            raise PayloadTooLarge(f"{len(entries) + len(found)} instances do not fit a uint16 instance mask: "
                                  "raise min_area or leave out instance_mask")
        first = len(entries) + 1
        entries += [{"id": first + n, "class_id": c.id, "class": c.name, **region} for n, region in enumerate(found)]
        if ids is not None and found:
            ids = np.where(regions > 0, regions + (first - 1), ids).astype(np.uint16)
        counts.append({"id": c.id, "name": c.name, "count": len(found)})
    body = {**_answer_head(masks, config), "counts": counts, "instances": entries, "mask_format": "instances",
            "coordinates": "pixel centres, x right, y down, origin at the top-left pixel"}
    if ids is not None:
        body["instance_mask"] = base64.b64encode(instance_mask_png(ids)).decode("ascii")
        body["instance_mask_format"] = "png;base64;uint16"
    return _dumps(body)


def probs_npy(probs: np.ndarray) -> bytes:
    """float16 (C, H, W) class probabilities as a .npy file (`numpy.load(io.BytesIO(body))`)."""
    buffer = io.BytesIO()
    np.save(buffer, probs.astype(np.float16), allow_pickle=False)
    return buffer.getvalue()


def overlay_jpeg(image: Image.Image, mask: np.ndarray, config: ServingConfig, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    overlay(image, mask, config).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def overlay(image: Image.Image, mask: np.ndarray, config: ServingConfig, alpha: float = 0.45,
            legend: bool = True) -> Image.Image:
    """The input in grey with the mask's class colours blended over it (background left uncoloured), each region
    outlined in its full class colour, and a small legend. Grey, so that the only colour is the mask's: a
    fluorescence stain often has the class colour's own hue (green cytoplasm, blue nuclei)."""
    from PIL import ImageDraw

    grey = np.asarray(image.convert("L"))
    colors = np.zeros((256, 3), np.float32)
    colors[[c.id for c in config.classes]] = [c.color for c in config.classes]
    out = np.empty((*mask.shape, 3), np.uint8)
    height = mask.shape[0]
    # A band of rows at a time (one more row each side for the outlines): float32 temporaries of a band, not
    # of the image, so a few bytes a pixel.
    rows = max(1, OVERLAY_BAND_PIXELS // max(1, mask.shape[1]))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        low, high = max(0, top - 1), min(height, bottom + 1)
        labels, foreground = mask[low:high], mask[low:high] > 0
        shade = grey[low:high].astype(np.float32)[..., None]
        part = np.where(foreground[..., None], shade * (1 - alpha) + colors[labels] * alpha, shade)
        edge = np.zeros(labels.shape, bool)  # a region's own pixels next to (4-neighbour) another class
        across, down = labels[:, :-1] != labels[:, 1:], labels[:-1, :] != labels[1:, :]
        edge[:, :-1] |= across
        edge[:, 1:] |= across
        edge[:-1, :] |= down
        edge[1:, :] |= down
        edge &= foreground
        part[edge] = colors[labels[edge]]
        out[top:bottom] = part[top - low: top - low + bottom - top].round().astype(np.uint8)
    result = Image.fromarray(out, "RGB")
    del out
    if legend:
        draw = ImageDraw.Draw(result)
        box = max(8, min(result.size) // 40)
        for row, c in enumerate(config.classes):
            top = 4 + row * (box + 4)
            draw.rectangle([4, top, 4 + box, top + box], fill=c.color, outline=(255, 255, 255))
            draw.text((8 + box, top - 1), c.name, fill=(255, 255, 255))
    return result
