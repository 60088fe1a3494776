"""Binary masks -> valid polygons along pixel edges (GeoJSON coordinates), checked valid by shapely.

A pixel (x, y) is the square [x, x + 1] x [y, y + 1], so a one-pixel region is a unit square and a
one-pixel-wide line a thin rectangle, never a degenerate ring. Why hand-written: OpenCV traces the
centres of boundary pixels (rings of 2 points for one pixel, holes running along the outer ring), and
polygonizers that trace pixel edges (GDAL's, via rasterio) are a large dependency. The trick: trace the
mask upsampled 2x (each pixel a 2x2 block); a traced boundary point u of the upsampled mask is the edge
(u + 1) // 2 of the original pixels. Where two pixels touch only at a corner the ring pinches to a point,
which shapely's `make_valid` splits into polygons touching there. Filling the polygons gives back exactly
the mask's pixels (tested: the pixel centres inside are the mask).
"""

from __future__ import annotations

import numpy as np


def polygons(binary: np.ndarray, max_vertices: int | None = None) -> list:
    """The mask's regions as shapely Polygons (valid, non-overlapping; holes kept), in pixel-edge coordinates.
    Over `max_vertices` traced vertices, ValueError before any polygon is built."""
    import cv2
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.validation import make_valid

    if not binary.any():
        return []
    up = np.repeat(np.repeat(binary.astype(np.uint8), 2, 0), 2, 1)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    vertices = sum(len(contour) + 1 for contour in contours)
    if max_vertices is not None and vertices > max_vertices:
        raise ValueError(f"this mask traces to {vertices} vertices, over {max_vertices}")
    hierarchy = hierarchy[0]
    shapes = []
    for index, (_, _, child, parent) in enumerate(hierarchy):
        if parent != -1:
            continue
        holes = []
        while child != -1:
            holes.append((contours[child].reshape(-1, 2) + 1) // 2)
            child = hierarchy[child][0]
        shape = Polygon((contours[index].reshape(-1, 2) + 1) // 2, holes)
        if not shape.is_valid:  # pinched where pixels touch at a corner
            fixed = make_valid(shape)
            parts = getattr(fixed, "geoms", [fixed])
            shapes += [part for part in parts if isinstance(part, Polygon) and not part.is_empty]
            shapes += [p for part in parts if isinstance(part, MultiPolygon) for p in part.geoms]
        else:
            shapes.append(shape)
    return shapes


def multipolygon_coordinates(shapes: list) -> list[list[list[list[int]]]]:
    """GeoJSON MultiPolygon coordinates: [[exterior, hole, ...], ...], closed rings of [x, y] (whole numbers;
    exteriors counter-clockwise, holes clockwise, as RFC 7946 asks)."""
    from shapely.geometry.polygon import orient

    def ring(coords) -> list[list[int]]:
        return [[int(round(x)), int(round(y))] for x, y in coords]

    out = []
    for shape in shapes:
        shape = orient(shape, sign=1.0)
        out.append([ring(shape.exterior.coords), *(ring(hole.coords) for hole in shape.interiors)])
    return out
